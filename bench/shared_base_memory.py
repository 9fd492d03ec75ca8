"""Memory of 2 concurrent Tune trials: one frozen base shared through the object store vs a private copy each.

Each trial builds its base (shared: `SharedBase.materialise`, zero-copy; private: `load_frozen_base`),
trains a packed epoch on a few survey questions, and samples its own proportional set size (PSS) meanwhile.
Prints JSON: the sum of the trials' peak PSS for each variant and the ratio private/shared.

    python -m bench.shared_base_memory --model smollm2-135m --dtype float32
"""

from __future__ import annotations

import argparse
import threading
import time

import psutil
import ray
from ray import tune

from bench.common import DATA, machine, model_path, write_report
from orchestrator.encoding import encode
from orchestrator.survey import load_survey, select_cultures
from workers.base_model import load_frozen_base
from workers.prompts import SoftPromptBank
from workers.shared_base import SharedBase
from workers.trainer import PackedTrainer, TrainConfig


def peak_pss_trial(params: dict, shared: SharedBase, records: list) -> None:
    """Build the base (shared or private), train one packed epoch, report this process's peak PSS."""
    process, peak, done = psutil.Process(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_full_info().pss)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if params["variant"] == "shared":
        base = shared.materialise("cpu")
    else:
        base = load_frozen_base(shared.name, shared.dtype, "cpu")
    culture = params["culture"]
    questions = encode(base, [r for r in records if r.culture == culture][:8], 320)
    bank = SoftPromptBank.initialise(base, [culture], 8)
    PackedTrainer(base, bank, {culture: questions}, {}, TrainConfig(batch_size=4)).train_epoch()
    done.set()
    sampler.join()
    tune.report({"peak_pss_mb": peak[0] / 2**20})


def run_variant(variant: str, shared: SharedBase, records: list, cultures: list[str]) -> list[float]:
    trainable = tune.with_resources(
        tune.with_parameters(peak_pss_trial, shared=shared, records=records), {"cpu": 1}
    )
    space = {"variant": variant, "culture": tune.grid_search(cultures)}
    results = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(max_concurrent_trials=2),
        run_config=tune.RunConfig(name=f"pss-{variant}", verbose=0),
    ).fit()
    return [r.metrics["peak_pss_mb"] for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    records, _ = load_survey(DATA)
    cultures = select_cultures(records, top=2).trained
    shared = SharedBase.load(model_path(args.model), args.dtype)
    weights_mb = sum(a.nbytes for a in shared.tensors.values()) / 2**20
    shared_pss = run_variant("shared", shared, records, cultures)
    private_pss = run_variant("private", shared, records, cultures)
    report = {
        "benchmark": "shared_base_memory",
        "machine": machine(),
        "model": args.model,
        "dtype": args.dtype,
        "weights_mb": weights_mb,
        "trials": 2,
        "shared_peak_pss_mb": shared_pss,
        "private_peak_pss_mb": private_pss,
        "shared_sum_mb": sum(shared_pss),
        "private_sum_mb": sum(private_pss),
        "ratio_private_over_shared": sum(private_pss) / sum(shared_pss),
    }
    write_report(report, args.out)
    ray.shutdown()


if __name__ == "__main__":
    main()
