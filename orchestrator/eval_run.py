"""The evaluation driver (`shores eval`): load the experts, build the router's committees, score, report, log."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from orchestrator.config import ExperimentConfig
from orchestrator.evaluate import evaluate_beside_transfer, served_committees
from orchestrator.registry import TrackingError
from orchestrator.report_view import format_table, write_report
from orchestrator.survey import (
    TRANSFER_SPLITS,
    SurveyDataError,
    foreign_data,
    load_survey,
    prepare_data,
    present_cultures,
)
from orchestrator.tracking import ExperimentTracker, evaluation_run_name
from workers.base_model import load_frozen_base
from workers.cultures import is_shared
from workers.expert_store import (
    SIMILARITY_FILE,
    Registry,
    download_champions,
    load_experts,
    load_similarity,
    registered_experts,
)


def run_evaluation(
    config: ExperimentConfig,
    out: Path,
    data_file: str | None = None,
    split: str | None = None,
    experts_from: str | None = None,
) -> dict:
    """Score every method on the survey records, write the report (JSON and PNG) to `out`, log it to MLflow.

    `data_file`: another survey file (its records of the experts' cultures; default: the config's data).
    `split`: the questions to score (default: test; with `data_file`: all); transfer_val and transfer_test
    need `data.transfer`, which also adds the transfer split's section beside test and val. `experts_from`: a
    directory or a registry alias (default: the config's experts directory).
    """
    if split in TRANSFER_SPLITS and config.data.transfer is None:
        raise SurveyDataError(
            f"--split {split} needs a transfer split in the config (data.transfer.hold_out)"
        )
    # The data is read before the model loads, so a bad file fails at once.
    if data_file:
        records, loaded = load_survey(data_file)
    else:
        data = prepare_data(config.data)
        loaded = data.report
    print(f"data: {loaded.summary()}", file=sys.stderr)
    base = load_frozen_base(config.base_model.name, config.base_model.dtype, config.base_model.device)
    experts_dir, versions = resolve_experts(config, experts_from)
    experts = load_experts(experts_dir, base)
    names = [e.meta.culture for e in experts]
    notes, cultures = [], [c for c in names if not is_shared(c)]
    if data_file:
        # Not the training file: evaluate the experts we have on whatever of their cultures it holds.
        data, notes = foreign_data(config.data, records, loaded, cultures)
        versions = {}  # the registry's `<split>_alignment` tags speak of the training file's splits only
    else:
        # The published set holds the cultures of every run that added to it, not only this config's.
        selection, _ = present_cultures(data.records, cultures, config.data.held_out, loaded.path)
        data = replace(data, selection=selection)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    split = split or ("all" if data_file else "test")
    cultures = data.selection.trained + data.selection.held_out
    # The router's committees: a culture's own expert, else its nearest experts by survey similarity
    # (written beside the experts at training; registry downloads take it from the config's experts dir).
    similarity_file = experts_dir / SIMILARITY_FILE
    similarity = load_similarity(
        similarity_file if similarity_file.exists() else config.experts_dir / SIMILARITY_FILE
    )
    routing = config.serve.routing
    # Each file's prior weight (fitted at training): the experts' shares, and the committees' in the prior's file.
    committees = served_committees(experts, similarity, routing.committee_size, routing.routing_temperature)
    report = evaluate_beside_transfer(
        base,
        experts,
        data,
        split,
        cultures,
        committees=committees,
        batch_size=config.eval.batch_size,
        max_length=config.data.max_length,
        n_bootstrap=config.eval.bootstrap,
    )
    report["data"] = data.report.path
    report["data_file"] = data_file  # None: the config's own data, split as training split it
    report["notes"] = notes
    json_path, png_path = write_report(report, out)
    print(format_table(report))
    print(f"wrote {json_path} and {png_path}")
    log_evaluation(config, report, [json_path, png_path], versions)
    return report


def log_evaluation(
    config: ExperimentConfig, report: dict, files: list[Path], versions: dict[str, tuple[str, int]]
) -> None:
    """Log an evaluation into the experiment; a store that is down costs the log, never the report."""
    tracker = ExperimentTracker(config)
    try:
        run_id = tracker.evaluation_finished(report, files, versions)
    except TrackingError as err:
        print(f"warning: {err}; the report is only in {files[0]}", file=sys.stderr)
        return
    tagged = (
        f"; tagged {len(versions)} champion versions with {report['split']}_alignment" if versions else ""
    )
    print(f"logged to MLflow: run {evaluation_run_name(report)} ({tracker.run_url(run_id)}){tagged}")


def resolve_experts(config: ExperimentConfig, choice: str | None) -> tuple[Path, dict[str, tuple[str, int]]]:
    """A directory of experts (the given folder, the config's own, or a registry alias downloaded) and,
    for an alias, the registered (model, version) of each culture's expert."""
    if choice is None:
        return config.experts_dir, {}
    if Path(choice).is_dir():
        return Path(choice), {}
    registry = Registry.of_experiment(config.output_dir, config.mlflow)
    # Read before the download: the versions evaluated are the ones the alias named when it started.
    rows = [r for r in registered_experts(registry) if choice in r["aliases"]]
    versions = {r["culture"]: (r["model"], r["version"]) for r in rows}
    return download_champions(registry, Path(config.output_dir) / "registry" / choice, choice), versions
