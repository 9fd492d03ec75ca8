"""An expert's life on the tiny model, with real Ray Tune, a real sqlite MLflow and a real Serve: cultures
added, retrained, kept through a failed run, retired and rolled back, while the served set follows."""

import hashlib
import io
import json
from contextlib import redirect_stderr
from pathlib import Path

import pytest

from orchestrator.cli import main as shores_main
from orchestrator.registry import Store
from tests.conftest import TINY_CONFIG, running_ray, tiny_config
from tests.serving import client, local_serve, wait_for
from tests.test_tune import champions
from workers.expert_file import load_expert
from workers.expert_store import SIMILARITY_FILE, RegistrySource, registered_experts

pytestmark = pytest.mark.slow  # its runs train on a local Ray and serve on Ray Serve


def content_version(path: Path) -> str:
    """How the directory source names an expert's version: its file's content."""
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def published(experts: Path) -> dict[str, dict]:
    """Culture -> the training summary of each published expert."""
    return {p.stem: load_expert(p).meta.training for p in sorted(experts.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def lifecycle(llama_dir, tmp_path_factory):
    """Train Germany and Japan, then Kenya alone, then Germany again with a learning rate that cannot learn,
    then Germany in a run whose only trial fails; return the output folder, the CLI's --set list and what
    each run printed."""
    out = tmp_path_factory.mktemp("lifecycle")
    common = [
        "train.epochs=1",
        "tune.scheduler=fifo",
        "tune.experts_per_trial=2",
        "serve.deployment.reload_interval_s=0.2",
    ]
    config, sets = tiny_config(llama_dir, out, *common)
    runs = {
        "first": ["name=first", "data.cultures=[Germany, Japan]"],
        "added": ["name=added", "data.cultures=[Kenya]"],
        "worse": ["name=worse", "data.cultures=[Germany]", "train.lr=1e-9", "prompt.init=random"],
        "failed": ["name=failed", "data.cultures=[Germany]", "tune.max_failures=0"],
    }
    codes = {}
    with running_ray():
        for run, extra in runs.items():
            args = [*sets, *(x for s in extra for x in ("--set", s))]
            if run == "failed":  # out of memory in epoch 1, before any checkpoint, on every attempt
                with pytest.MonkeyPatch.context() as patch, redirect_stderr(io.StringIO()) as err:
                    patch.setenv("SHORES_FAULT", "out-of-memory:0:1")
                    codes[run] = shores_main(["train", "--config", str(TINY_CONFIG), *args])
                failure = err.getvalue()
            else:
                codes[run] = shores_main(["train", "--config", str(TINY_CONFIG), *args])
            if run == "worse":
                worse_folder = published(config.experts_dir)
    return config, sets, codes, worse_folder, failure


def test_cultures_accumulate_a_worse_retrain_and_a_failed_run_keep_the_served_set(lifecycle):
    config, _, codes, after_worse, _ = lifecycle
    assert codes == {"first": 0, "added": 0, "worse": 0, "failed": 1}
    store = Store.from_config(config)
    rows = registered_experts(store)
    germany = {r["version"]: r for r in rows if r["culture"] == "Germany"}
    assert sorted(germany) == [1, 2]  # the failed run registered nothing
    assert germany[2]["val_alignment"] < germany[1]["val_alignment"]  # the retrain is worse ...
    assert champions(store)["Germany"]["version"] == 1  # ... so the first stays champion ...
    assert after_worse["germany"]["lr"] == 0.05  # ... and published
    experts = published(config.experts_dir)
    assert sorted(experts) == ["germany", "japan", "kenya"]  # the failed run changed nothing
    assert experts["germany"]["lr"] == 0.05 and experts["germany"]["experiment"] == "first"
    assert experts["kenya"]["experiment"] == "added"
    similarity = json.loads((config.experts_dir / SIMILARITY_FILE).read_text())
    assert set(similarity["Germany"]) == {"Japan", "Kenya"} and set(similarity["Kenya"]) == {
        "Germany",
        "Japan",
    }
    assert set(similarity["Canada"]) == {"Germany", "Japan", "Kenya"}  # held out: a committee of all three


def test_eval_reports_every_published_culture_not_only_the_configs(lifecycle, tmp_path):
    _, sets, _, _, _ = lifecycle
    out = tmp_path / "report.json"
    # The config names Germany alone (the last run's); the published set holds three runs' cultures.
    args = [
        "eval",
        "--config",
        str(TINY_CONFIG),
        *sets,
        "--set",
        "data.cultures=[Germany]",
        "--out",
        str(out),
    ]
    assert shores_main(args) == 0
    report = json.loads(out.read_text())["cultures"]
    assert {c for c, row in report.items() if row["expert"] is not None} == {"Germany", "Japan", "Kenya"}


def test_a_failed_run_exits_1_naming_the_culture_and_how_to_resume(lifecycle):
    _, _, codes, _, failure = lifecycle
    assert codes["failed"] == 1
    (line,) = [line for line in failure.splitlines() if line.startswith("trial ")]
    assert "(Germany) failed: MemoryError" in line and "shores train --resume" in line
    assert "they keep their published experts" in failure


def test_retire_and_roll_back_are_served_without_a_restart(lifecycle, capsys):
    config, sets, _, _, _ = lifecycle
    store = Store.from_config(config)
    registry_source = RegistrySource(store, "champion", Path(config.output_dir) / "dl", Path("unused"))
    before = registry_source.version()
    with local_serve(config, num_cpus=2) as url, client(url) as http:

        def served() -> dict[str, str]:
            return {e["culture"]: e["version"] for e in http.get("/v1/experts").json()["experts"]}

        experts = config.experts_dir
        files = {
            c: content_version(experts / f"{c.lower()}.safetensors") for c in ("Germany", "Japan", "Kenya")
        }
        assert served() == files

        assert shores_main(["experts", "retire", "Japan", "--config", str(TINY_CONFIG), *sets]) == 0
        assert wait_for(lambda: set(served()) == {"Germany", "Kenya"})
        assert registry_source.version() != before and "Japan" not in registry_source.champions()
        model = store.client().get_registered_model("shores-japan")
        assert model.tags["shores.retired"] == "1" and model.tags["shores.retired_by"]
        assert {r["version"] for r in registered_experts(store) if r["culture"] == "Japan"} == {1}  # kept

        # Version 2 validates worse: the champion gate refuses it, unless forced (a roll back).
        assert shores_main(["experts", "promote", "Germany", "2", "--config", str(TINY_CONFIG), *sets]) == 1
        assert "not promoted: shores-germany v2" in capsys.readouterr().err
        assert (
            shores_main(
                ["experts", "promote", "Germany", "2", "--force", "--config", str(TINY_CONFIG), *sets]
            )
            == 0
        )
        assert champions(store)["Germany"]["version"] == 2
        rolled_back = content_version(experts / "germany.safetensors")
        assert rolled_back != files["Germany"]
        assert wait_for(lambda: served().get("Germany") == rolled_back)
        assert served()["Kenya"] == files["Kenya"]
        similarity = json.loads((experts / SIMILARITY_FILE).read_text())
        assert set(similarity["Canada"]) == {"Germany", "Kenya"}

        # Bad input is one line and changes nothing.
        assert shores_main(["experts", "promote", "Germany", "9", "--config", str(TINY_CONFIG), *sets]) == 2
        assert "shores-germany has no version 9; its versions: 1, 2" in capsys.readouterr().err
        assert shores_main(["publish", "--from-registry", "--config", str(TINY_CONFIG), *sets]) == 0
        assert sorted(published(experts)) == ["germany", "kenya"]  # exactly the champions
