"""`strategy: deepspeed`: 2 gloo workers under ZeRO-3 train what one process trains; bad settings never start."""

import copy
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.config import ConfigError, load_config
from orchestrator.deepspeed_trial import validate_deepspeed
from orchestrator.tune import trial_resources
from tests.conftest import OPINIONS, REPO, TINY_CONFIG, free_ports
from tests.test_trainer import _config
from workers.prompts import SoftPromptBank

# The ~25 s JIT compile of DeepSpeed's CPU comm op is cached here, as `make test` does (Ray workers inherit it).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))


def ds_config(model_dir, out, *overrides):
    sets = [
        f"base_model.name={model_dir}",
        f"output_dir={out}",
        f"data.path={OPINIONS}",
        "strategy=deepspeed",
    ]
    return load_config(TINY_CONFIG, [*sets, *overrides])


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "deepspeed.config={zero_optimisation: {stage: 3}}",
            "deepspeed.config.zero_optimisation: not a DeepSpeed",
        ),
        ("deepspeed.config={zero_optimization: {stage: 7}}", "deepspeed.config.zero_optimization.stage"),
        ("deepspeed.config={zero_optimization: {stagee: 1}}", "deepspeed.config.zero_optimization.stagee"),
        ("deepspeed.config={train_batch_size: 7}", "batch sizes do not multiply out: train_batch_size 7"),
        (
            "deepspeed.config={train_micro_batch_size_per_gpu: 2, train_batch_size: 4}",
            "contradicts train.batch_size",
        ),
        ("deepspeed.config={gradient_accumulation_steps: 3}", "batch sizes do not multiply out"),
        ("deepspeed.config={optimizer: {type: Adam}}", "deepspeed.config.optimizer: not allowed"),
        ("deepspeed.config={fp16: {enabled: maybe}}", "deepspeed.config.fp16.enabled"),
    ],
)
def test_bad_deepspeed_settings_are_rejected_naming_the_setting(override, message, llama_dir, tmp_path):
    import ray

    config = ds_config(llama_dir, tmp_path, override)
    with pytest.raises(ConfigError, match=message) as caught:  # the CLI's one-line error
        validate_deepspeed(config)
    assert "\n" not in str(caught.value)
    assert not ray.is_initialized()  # rejected before anything started


def test_validate_ds_config_checks_a_plain_deepspeed_config():
    from workers.deepspeed_config import validate_ds_config

    good = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}
    assert validate_ds_config(good, world_size=2) is good
    with pytest.raises(ValueError, match=r"^deepspeed.config.zero_optimization.stage: Input should be"):
        validate_ds_config({"train_batch_size": 8, "zero_optimization": {"stage": 4}})
    with pytest.raises(ValueError, match="not a multiple of 3 workers"):
        validate_ds_config({"train_batch_size": 8}, world_size=3)
    with pytest.raises(
        ValueError, match=r"^deepspeed.config.gradient_clip: not a DeepSpeed setting \(did you mean"
    ):
        validate_ds_config({"train_batch_size": 8, "gradient_clip": 1.0})


def test_bad_zero_stage_and_worker_count_are_config_errors(llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="deepspeed.zero_stage"):
        ds_config(llama_dir, tmp_path, "deepspeed.zero_stage=5")
    with pytest.raises(ConfigError, match="deepspeed.num_workers"):
        ds_config(llama_dir, tmp_path, "deepspeed.num_workers=0")


def test_good_settings_pass_and_a_trial_holds_only_a_small_cpu_share(llama_dir, tmp_path):
    from orchestrator.deepspeed_trial import trial_ds_config, worker_cpus

    config = ds_config(
        llama_dir, tmp_path, "deepspeed.config={zero_optimization: {stage: 3, overlap_comm: false}}"
    )
    validate_deepspeed(config)
    ds = trial_ds_config(config, n_experts=3)  # 3 experts x 8 rows over 2 workers: 12 rows each
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": False}
    assert (ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"]) == (12, 24)
    assert trial_resources(config)["cpu"] < 0.5
    assert worker_cpus(config) * config.deepspeed.num_workers + trial_resources(config)["cpu"] <= 1.0


@pytest.fixture(scope="module")
def one_worker_group():
    """torch.distributed with one process (gloo), in this process: DeepSpeed adopts it."""
    import torch.distributed as dist

    (port,) = free_ports(1)
    env = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def llama_shared(llama_dir):
    from workers.shared_base import SharedBase

    return SharedBase.load(str(llama_dir))


@pytest.fixture(scope="module")
def one_process_run(llama_shared):
    """A small PackedTrainer run (2 cultures of unequal size, so an expert idles in some steps)."""
    from tests.test_trainer import _data
    from workers.prompts import SoftPromptBank
    from workers.trainer import PackedTrainer, TrainConfig

    cultures = ["Germany", "Japan"]
    base = llama_shared.materialise("cpu")
    train, val = _data(base.tokenizer, {"Germany": 5, "Japan": 3})
    config = TrainConfig(
        epochs=2, batch_size=2, grad_accum=2, lr=0.05, weight_decay=0.01, patience=10, seed=3
    )
    start = SoftPromptBank.initialise(base, cultures, 3, init="random", seed=1).weight.detach()
    single = PackedTrainer(base, SoftPromptBank(cultures, start), train, val, config)
    single.fit()
    return cultures, train, val, config, start, single


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_zero_stage_trains_and_resumes_like_one_process(
    stage, llama_shared, one_process_run, one_worker_group
):
    """One worker, each ZeRO stage: the same prompts, gradient norms and AdamW state as PackedTrainer, and a
    trainer rebuilt from its epoch-1 state continues exactly."""
    from types import SimpleNamespace

    from workers.deepspeed_config import ds_config
    from workers.prompts import SoftPromptBank
    from workers.zero import ZeroTrainer

    cultures, train, val, config, start, single = one_process_run
    ds = ds_config(SimpleNamespace(num_workers=1, zero_stage=stage, config={}), 4, config.grad_accum)
    # ZeRO-3 turns a base's weights into its shards: one base a trainer.
    zero = ZeroTrainer(
        llama_shared.materialise("cpu"), SoftPromptBank(cultures, start), train, val, config, ds=ds
    )
    states = []
    zero.fit(lambda epoch, trainer: states.append(trainer.state_dict()))
    resumed = ZeroTrainer(
        llama_shared.materialise("cpu"), SoftPromptBank(cultures, start), train, val, config, ds=ds
    )
    resumed.load_state_dict(states[0])
    resumed.fit()
    assert base_max_change(zero, llama_shared.tensors) == 0.0  # the frozen base is untouched
    expected = single.state_dict()["optimizer"]["state"]
    for i, culture in enumerate(cultures):
        torch.testing.assert_close(
            zero.best_prompts[culture], single.best_prompts[culture], atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            resumed.best_prompts[culture], single.best_prompts[culture], atol=1e-5, rtol=0
        )
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                states[-1]["optimizer"]["state"][i][key], expected[i][key], atol=1e-6, rtol=1e-4
            )
    assert zero.grad_norms == pytest.approx(single.grad_norms, rel=1e-5)


def base_max_change(trainer, reference: dict[str, np.ndarray]) -> float:
    """The largest absolute change of any frozen base weight of a ZeroTrainer from `reference` (SharedBase.tensors).

    Gathers every shard: every worker takes part.
    """
    import deepspeed

    worst = 0.0
    for name, p in trainer.base.model.named_parameters():
        if name in reference:
            with deepspeed.zero.GatheredParameters([p]):
                change = (p.detach().cpu().float() - torch.from_numpy(reference[name]).float()).abs().max()
                worst = max(worst, float(change))
    return worst


@pytest.mark.slow
def test_a_killed_zero3_trial_resumes_on_new_workers_to_what_one_process_trains(
    llama_dir, tmp_path, local_ray, monkeypatch
):
    """2 gloo workers under ZeRO-3 give what PackedTrainer gives: prompts, losses, gradient norms, validation,
    and the checkpoints the driver reads from a packed trial. The trial kills itself once Tune has its
    epoch-1 checkpoint: its workers' resources are freed, and the retried trial resumes on new workers.

    Uruguay has 9 training questions, Croatia 7: with 2 rows each a micro-batch and 2 micro-batches a step,
    Croatia idles in the last step of each epoch, whose one micro-batch has one row (one worker gets none).
    """
    monkeypatch.setenv("SHORES_FAULT", "kill-after-checkpoint:0:1")
    _train_on_two_workers_and_compare(llama_dir, tmp_path, epochs=2)


@pytest.mark.slow
def test_a_stopped_zero3_trial_frees_its_workers(llama_dir, tmp_path, local_ray):
    """Tune stops the trial after its first epoch (as ASHA does): its Train workers' resources come back."""
    import ray
    from ray import tune
    from ray.util.placement_group import placement_group, remove_placement_group

    from orchestrator.survey import prepare_data
    from orchestrator.tune import make_trainable
    from workers.shared_base import SharedBase

    config = ds_config(
        llama_dir, tmp_path, "data.cultures=[Uruguay, Croatia]", "tune.cpus_per_trial=2", "train.epochs=3"
    )
    trainable = make_trainable(config, prepare_data(config.data), SharedBase.load(str(llama_dir)))
    results = tune.Tuner(
        trainable,
        param_space={"group": 0},
        run_config=tune.RunConfig(
            name="ds", storage_path=str(tmp_path / "tune"), stop={"training_iteration": 1}
        ),
    ).fit()
    assert results[0].metrics["epoch"] == 1 and results[0].checkpoint is not None
    # Both CPUs can be reserved again: waits for the event, fails if the workers still hold them.
    everything = placement_group([{"CPU": 2}])
    ray.get(everything.ready(), timeout=60)
    remove_placement_group(everything)


def _train_on_two_workers_and_compare(llama_dir, tmp_path, epochs: int) -> None:
    from orchestrator.encoding import encoded
    from orchestrator.results import best_experts
    from orchestrator.survey import prepare_data
    from orchestrator.trial import load_trainer_state
    from orchestrator.tune import tuner
    from workers.expert_file import load_expert
    from workers.prompts import SoftPromptBank
    from workers.shared_base import SharedBase
    from workers.trainer import PackedTrainer

    config = ds_config(
        llama_dir,
        tmp_path,
        "data.cultures=[Uruguay, Croatia]",
        "tune.experts_per_trial=2",
        "tune.cpus_per_trial=2",
        "deepspeed.num_workers=2",
        "deepspeed.zero_stage=3",
        f"train.epochs={epochs}",
        "train.batch_size=2",
        "train.grad_accum=2",
        "train.patience=10",
        "tune.max_failures=1",
        "tune.scheduler=fifo",
    )
    validate_deepspeed(config)
    data = prepare_data(config.data)
    shared = SharedBase.load(str(llama_dir))
    cultures = data.selection.trained
    assert cultures == ["Uruguay", "Croatia"]

    started = time.time()
    results = tuner(config, data, shared).fit()  # SHORES_FAULT: the trial kills itself after epoch 1
    elapsed = time.time() - started
    result = results[0]
    assert result.error is None, result.error
    assert (tmp_path / "faults" / "kill-after-checkpoint-0-1").exists()
    # What the driver recorded with each checkpoint (result.json can miss a line across a retry).
    rows = sorted((metrics for _, metrics in result.best_checkpoints), key=lambda m: m["epoch"])
    # Resumed from its checkpoint, not from epoch 1, in a new trial process, by new workers.
    assert [row["epoch"] for row in rows] == list(range(1, epochs + 1))
    assert len({row["pid"] for row in rows}) == 2 and len({row["worker_pid"] for row in rows}) == 2
    assert all(row["num_workers"] == 2 and row["strategy"] == "deepspeed" for row in rows)
    history = {row["epoch"]: row for row in rows}

    # The same run in one process.
    base = shared.materialise("cpu")
    train, val = (encoded(base, data, split, cultures, config.data.max_length) for split in ("train", "val"))
    bank = SoftPromptBank.initialise(base, cultures, config.prompt.num_virtual_tokens, config.prompt.init)
    start = bank.weight.detach().clone()
    single = PackedTrainer(base, bank, train, val, config.train)
    reference = []
    single.fit(lambda epoch, t: reference.append((epoch, list(t.grad_norms), copy.deepcopy(t.state_dict()))))
    assert len(train["Uruguay"]) % 2 and len(train["Uruguay"]) > len(train["Croatia"])

    for epoch, norms, _ in reference:
        row = history[epoch.epoch]
        assert row["grad_norm"] == pytest.approx(
            sum(norms) / len(norms), rel=1e-4
        )  # the gradients' scale too
        for culture in cultures:
            assert row[f"train_loss/{culture}"] == pytest.approx(epoch.train_loss[culture], abs=1e-5)
            assert row[f"val_alignment/{culture}"] == pytest.approx(epoch.val_alignment[culture], abs=1e-5)

    # The last checkpoint: the trainer state in the single-process layout, and the experts the driver picks from.
    folder = Path(result.checkpoint.path)
    state = load_trainer_state(folder)
    expected = reference[-1][2]
    assert state["epoch"] == epochs
    for i, culture in enumerate(cultures):
        close = {"atol": 1e-4, "rtol": 0}
        torch.testing.assert_close(state["bank"][f"prompts.{i}"], expected["bank"][f"prompts.{i}"], **close)
        torch.testing.assert_close(state["best_prompts"][culture], single.best_prompts[culture], **close)
        expert = load_expert(folder / "experts" / f"{culture.lower()}.safetensors", base)  # same fingerprint
        torch.testing.assert_close(expert.prompt, single.best_prompts[culture], **close)
        mine, theirs = state["optimizer"]["state"][i], expected["optimizer"]["state"][i]
        assert float(mine["step"]) == float(theirs["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(mine[key], theirs[key], atol=1e-5, rtol=1e-3)
    assert float(state["optimizer"]["state"][0]["step"]) > float(state["optimizer"]["state"][1]["step"])
    assert not torch.allclose(torch.stack([single.best_prompts[c] for c in cultures]), start)  # it trained
    assert (folder / "experts" / "peft" / "uruguay" / "adapter_config.json").exists()
    assert set(best_experts(results)) == set(cultures)

    # The epoch-1 checkpoint also continues in one process exactly as the single-process run went on.
    first = next(c for c, m in result.best_checkpoints if m["epoch"] == 1)
    again = PackedTrainer(base, SoftPromptBank(cultures, start), train, val, config.train)
    again.load_state_dict(load_trainer_state(Path(first.path)))
    again.fit()
    for culture in cultures:
        torch.testing.assert_close(
            again.best_prompts[culture], single.best_prompts[culture], atol=1e-4, rtol=0
        )
    print(f"deepspeed trial (killed and resumed): {elapsed:.1f} s")


def test_zero_training_refuses_deep_experts(llama_base):
    from workers.zero import ZeroTrainer

    bank = SoftPromptBank.initialise(llama_base, ["Germany"], 2, kind="deep")
    with pytest.raises(ValueError, match="input prompts only"):
        ZeroTrainer(llama_base, bank, {}, {}, _config(), ds={})
