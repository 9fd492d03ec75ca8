"""`shores register --from` registers what training would have: the prior's weights of a driver stopped before
it calibrated the winners are written first, from the same data, as `finish` writes them."""

import shutil

import pytest

from orchestrator.calibration import CALIBRATED, calibrate_winners
from orchestrator.cli import main as shores_main
from orchestrator.driver import train
from orchestrator.registry import Store
from orchestrator.results import Winner
from orchestrator.survey import prepare_data
from tests.conftest import tiny_config
from workers.base_model import load_frozen_base
from workers.cultures import SHARED
from workers.expert_file import load_expert
from workers.expert_store import download_champions, expert_files, registered_experts

SETS = (
    "shared.enabled=true",
    "shared.max_questions=16",
    "shared.expert_prior_weight=auto",
    "train.epochs=1",
    "data.cultures=[Germany, Japan]",
)


def registered_weights(config, folder) -> dict[str, tuple[float, object]]:
    """Each registered champion's (prior weight, calibration mark), as its downloaded file holds them."""
    download_champions(Store.from_config(config), folder)
    metas = [load_expert(path).meta for path in expert_files(folder)]
    return {m.culture: (m.prior_weight, m.training.get(CALIBRATED)) for m in metas}


@pytest.mark.slow
def test_register_from_calibrates_the_winners_of_a_driver_stopped_before_calibration(
    llama_dir, tmp_path, local_ray, monkeypatch, capsys
):
    out = tmp_path / "run"
    config, _ = tiny_config(llama_dir, out, *SETS)
    monkeypatch.setenv("SHORES_FAULT", "interrupt-before-calibration")
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.delenv("SHORES_FAULT")
    assert not registered_experts(Store.from_config(config)) and not (out / "experts").exists()

    # What an uninterrupted run's `finish` writes: the same function on the same data, on copies of the stopped
    # run's winners taken before `register --from` touches them (one checkpoint a trial: one epoch).
    expected = tmp_path / "expected"
    expected.mkdir()
    for path in (out / "tune").rglob("*.safetensors"):
        if "peft" not in path.parts:
            assert load_expert(path).meta.training.get(CALIBRATED) is None  # stopped before calibration
            shutil.copy2(path, expected / path.name)
    winners = {load_expert(p).meta.culture: p for p in expert_files(expected)}
    assert set(winners) == {"Germany", "Japan", SHARED}
    data = prepare_data(config.data, shared=config.shared)
    copies = {c: Winner(c, "copy", expected, 0.0) for c in winners}
    calibrate_winners(config, data, copies, lambda: load_frozen_base(str(llama_dir), device="cpu"))
    uninterrupted = {c: (load_expert(w.expert_file).meta.prior_weight, "auto") for c, w in copies.items()}

    capsys.readouterr()
    assert shores_main(["register", "--from", str(out)]) == 0
    assert "calibrating Germany, Japan, shared" in capsys.readouterr().out
    assert registered_weights(config, tmp_path / "registered") == uninterrupted

    # Registering again calibrates nothing: the files hold their weights now.
    assert shores_main(["register", "--from", str(out)]) == 0
    assert "calibrating" not in capsys.readouterr().out


def test_register_from_names_the_missing_data_it_would_calibrate_on(llama_dir, tmp_path, monkeypatch):
    """Without the experiment's data, `register --from` refuses in one line naming what it lacks."""
    from orchestrator import driver

    config, _ = tiny_config(llama_dir, tmp_path, *SETS)
    monkeypatch.setattr(driver, "uncalibrated", lambda config, winners: ["Germany"])
    gone = config.model_copy(
        update={"data": config.data.model_copy(update={"path": str(tmp_path / "gone.jsonl")})}
    )
    with pytest.raises(driver.SurveyDataError, match=r"^Germany lack the prior's weights .*gone\.jsonl"):
        driver.calibrate_pending(gone, {})
