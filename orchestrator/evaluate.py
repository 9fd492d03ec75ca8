"""Alignment reports: every method scored on the same survey records, per culture and overall."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from orchestrator.encoding import encode
from orchestrator.survey import ExperimentData, SurveyDataError, SurveyRecord, normalise_question
from workers.base_model import FrozenBase
from workers.committees import Committee, question_committee
from workers.cultures import SHARED, UnknownCultureError, is_shared
from workers.defaults import EVAL_BATCH_SIZE, MAX_LENGTH
from workers.expert_file import Expert
from workers.expert_store import Similarity
from workers.prompts import NO_EXPERT, bank_from_experts
from workers.scoring import (
    alignment,
    bootstrap_ci,
    natural_log_alignment,
    option_distributions,
    paired_bootstrap_ci,
)

METHODS = ("base", "persona", SHARED, "expert", "committee", "uniform", "agnostic")
PLOT_ROW = 16  # cultures a row of the report's chart
# Paired differences over the same records: is a culture's expert, or its committee, worth more than the
# shared prior; is the expert worth more than the base?
DIFFERENCES = (("expert", SHARED), ("committee", SHARED), ("expert", "base"))
# With a transfer split (`data.transfer`), the half of it reported beside each split of the same role.
TRANSFER_BESIDE = {"test": "transfer_test", "val": "transfer_val"}


def agnostic_distribution(record: SurveyRecord, others: dict[str, list[SurveyRecord]]) -> np.ndarray | None:
    """The mean distribution of the other cultures for the same question and options: culture-blind best."""
    peers = [r for r in others.get(normalise_question(record.question), []) if r.culture != record.culture]
    peers = [r for r in peers if r.options == record.options]
    return np.mean([r.distribution for r in peers], axis=0) if peers else None


def served_committees(
    experts: list[Expert], similarity: Similarity, k: int, temperature: float
) -> Callable[[SurveyRecord], Committee | None]:
    """Each record's committee as the router serves its question: its culture's own expert, else its nearest
    experts, each with its share of the prior on the record's options; None for a culture with neither."""
    metas = [e.meta for e in experts]

    def committee(record: SurveyRecord) -> Committee | None:
        try:
            return question_committee(record.culture, record.options, metas, similarity, k, temperature)
        except UnknownCultureError:
            return None

    return committee


def evaluate(
    base: FrozenBase,
    experts: list[Expert],
    data: ExperimentData,
    split: str,
    cultures: list[str],
    committees: Callable[[SurveyRecord], Committee | None] | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    max_length: int = MAX_LENGTH,
    n_bootstrap: int = 1000,
) -> dict:
    """Score every method of METHODS on each culture's records in a split, and the paired differences."""
    bank = bank_from_experts(experts, base.device) if experts else None
    index = {e.meta.culture: i for i, e in enumerate(experts)}
    # The shared prior is scored on every record, and is no culture's own expert.
    shared = next((i for c, i in index.items() if is_shared(c)), None)
    own = {c for c in index if not is_shared(c)}
    committees = committees or served_committees(experts, {}, 1, 1.0)  # each culture's own expert, as served
    by_question = defaultdict(list)
    for record in data.records:
        by_question[normalise_question(record.question)].append(record)

    per_culture = data.records_of(split, cultures)
    records = [r for c in cultures for r in per_culture[c]]
    if not records:
        raise SurveyDataError(
            f"no records of {', '.join(cultures)} in the {split} split of {data.report.path}"
        )
    plain, persona = encode(base, records, max_length), encode(base, records, max_length, persona=True)
    # One batched pass for every column and every expert any committee needs: rows carry their own expert.
    columns = {"base": (plain, NO_EXPERT), "persona": (persona, NO_EXPERT)}
    if shared is not None:
        columns[SHARED] = (plain, shared)
    questions, expert_idx = [], []
    for encoded, expert in columns.values():
        questions += encoded
        expert_idx += [expert] * len(encoded)
    served = [committees(r) for r in records]
    member_rows = []
    for i, committee in enumerate(served):
        for member in committee.cultures if committee is not None else []:
            if member == SHARED and SHARED in columns:
                continue  # the prior as a member answers with its column's own rows: the same numbers
            member_rows.append((i, member))
            questions.append(plain[i])
            expert_idx.append(index[member])
    dists = option_distributions(
        base, bank, questions, expert_idx, batch_size, progress=f"eval {split} ({len(questions)} rows)"
    )
    n = len(records)
    column_d = {name: dists[k * n : (k + 1) * n] for k, name in enumerate(columns)}
    members = defaultdict(dict)
    for (i, culture), d in zip(member_rows, dists[len(columns) * n :]):
        members[i][culture] = d
    if SHARED in column_d:
        for i, d in enumerate(column_d[SHARED]):
            members[i][SHARED] = d

    scores: dict[str, dict[str, list[float]]] = {c: defaultdict(list) for c in cultures}
    for i, record in enumerate(records):
        survey = np.asarray(record.distribution)
        row = scores[record.culture]
        for name, d in column_d.items():
            row[name].append(alignment(d[i], survey))
        row["uniform"].append(alignment(np.full(len(survey), 1 / len(survey)), survey))
        if served[i] is not None:
            # A culture's own committee is its expert as served: with its share of the prior, if any.
            mix = sum(w * members[i][m] for m, w in served[i].members)
            row["committee"].append(alignment(mix, survey))
            if record.culture in own:
                row["expert"].append(row["committee"][-1])
        agnostic = agnostic_distribution(record, by_question)
        if agnostic is not None:
            row["agnostic"].append(alignment(agnostic, survey))
    report = {"cultures": {c: _summarise(scores[c], len(per_culture[c]), n_bootstrap) for c in cultures}}
    # Pooled differences pair records of the cultures with experts only: the others have no expert score.
    with_experts = _pool(scores, [c for c in cultures if c in own])
    report["overall"] = _summarise(_pool(scores, cultures), n, n_bootstrap, paired=with_experts)
    # Cultures with no expert of their own, answered by committees of other cultures' experts.
    held_out = [c for c in cultures if c not in own]
    if held_out:
        pooled = _pool(scores, held_out)
        report["held_out"] = _summarise(pooled, sum(len(per_culture[c]) for c in held_out), n_bootstrap)
        report["held_out"]["cultures"] = held_out
    report["split"] = split
    report["experts"] = {e.meta.culture: e.meta.training for e in experts}
    report["prior_weights"] = {e.meta.culture: e.meta.prior_weight for e in experts if e.meta.prior_weight}
    report["unfamiliar_prior_weights"] = {
        e.meta.culture: e.meta.format_gate.unfamiliar_weight for e in experts if e.meta.format_gate
    }
    return report


def evaluate_beside_transfer(
    base: FrozenBase, experts: list[Expert], data: ExperimentData, split: str, cultures: list[str], **options
) -> dict:
    """`evaluate` on a split and, where the data holds a transfer split, on its half of the same role
    (`TRANSFER_BESIDE`): the report's `transfer` section, scored the same way on the held-out programme's
    questions only."""
    report = evaluate(base, experts, data, split, cultures, **options)
    beside = TRANSFER_BESIDE.get(split) if data.transfer is not None else None
    if beside is not None:
        section = evaluate(base, experts, data, beside, cultures, **options)
        kept = ("split", "cultures", "overall", "held_out")
        report["transfer"] = {"hold_out": data.transfer.hold_out} | {
            k: section[k] for k in kept if k in section
        }
    return report


def _pool(scores: dict[str, dict[str, list[float]]], cultures: list[str]) -> dict[str, list[float]]:
    """The cultures' scores as one set of records, method by method (in culture order, so pairs stay paired)."""
    pooled: dict[str, list[float]] = defaultdict(list)
    for c in cultures:
        for method, values in scores[c].items():
            pooled[method] += values
    return pooled


def _summarise(
    scores: dict[str, list[float]], n: int, n_bootstrap: int, paired: dict[str, list[float]] | None = None
) -> dict:
    out: dict = {"n": n}
    for method in METHODS:
        values = scores.get(method, [])
        out[method] = float(np.mean(values)) if values else None
    out["ci95"] = {m: bootstrap_ci(v, n_bootstrap) for m, v in scores.items() if v}
    # The same means on the natural-log scale of published GOQA/WVS numbers (an exact affine map).
    out["natural_log"] = {m: natural_log_alignment(out[m]) for m in METHODS if out[m] is not None}
    out["differences"] = _differences(scores if paired is None else paired, n_bootstrap)
    return out


def _differences(scores: dict[str, list[float]], n_bootstrap: int) -> dict[str, dict | None]:
    """Each of DIFFERENCES over the records that have both scores: n, mean, 95% paired-bootstrap interval."""
    out: dict[str, dict | None] = {}
    for column, baseline in DIFFERENCES:
        a, b = scores.get(column, []), scores.get(baseline, [])
        out[f"{column}-{baseline}"] = (
            {
                "n": len(a),
                "mean": float(np.mean(np.subtract(a, b))),
                "ci95": list(paired_bootstrap_ci(a, b, n_bootstrap)),
            }
            if a and b
            else None
        )
    return out


def format_table(report: dict) -> str:
    """The report as fixed-width text: one row a culture, one column a method; the overall row on the
    natural-log scale; then the paired differences with their intervals; then the transfer section's tables."""
    header = f"{'culture':<24}{'n':>5}" + "".join(f"{m:>11}" for m in METHODS)
    lines = [header, "-" * len(header)]
    rows = list(report["cultures"].items()) + [("overall", report["overall"])]
    if "held_out" in report:
        rows.append(("held-out cultures", report["held_out"]))
    for name, row in rows:
        lines.append(f"{name:<24}{row['n']:>5}" + "".join(_cell(row[m]) for m in METHODS))
    natural = report["overall"].get("natural_log", {})
    lines.append(f"{'overall, natural log':<29}" + "".join(_cell(natural.get(m)) for m in METHODS))
    lines.append("(1 - JS distance, base 2; the natural-log line is the scale of published GOQA/WVS numbers)")

    names = [f"{column} - {baseline}" for column, baseline in DIFFERENCES]
    header = f"{'paired difference':<24}{'n':>5}" + "".join(f"{name:>28}" for name in names)
    lines += ["", header, "-" * len(header)]
    rows = list(report["cultures"].items()) + [("overall (with experts)", report["overall"])]
    if "held_out" in report:
        rows.append(("held-out cultures", report["held_out"]))
    for name, row in rows:
        cells = [row.get("differences", {}).get(f"{column}-{baseline}") for column, baseline in DIFFERENCES]
        if any(cells):
            n = next(c["n"] for c in cells if c)
            lines.append(f"{name:<24}{n:>5}" + "".join(_difference_cell(c) for c in cells))
    if "transfer" in report:
        section = report["transfer"]
        title = f"transfer split: {section['split']} ({section['hold_out']} questions, held out of training)"
        lines += ["", title, "=" * len(title), format_table(section)]
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return f"{value:>11.3f}" if value is not None else f"{'-':>11}"


def _difference_cell(entry: dict | None) -> str:
    if entry is None:
        return f"{'-':>28}"
    lo, hi = entry["ci95"]
    return f"{entry['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]".rjust(28)


def plot_report(report: dict, path: Path) -> Path:
    """A grouped bar chart of alignment per culture and method, with 95% intervals; many cultures wrap into
    rows of at most PLOT_ROW (a full report's 52 would otherwise be one unreadable strip)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["cultures"]) + ["overall"]
    rows = {c: report["cultures"][c] for c in names[:-1]} | {"overall": report["overall"]}
    methods = [m for m in METHODS if any(r[m] is not None for r in rows.values())]
    width = 0.8 / len(methods)
    n_panels = math.ceil(len(names) / PLOT_ROW)
    per_panel = math.ceil(len(names) / n_panels)  # rows of even length
    fig, axes = plt.subplots(n_panels, 1, figsize=(max(6, 1.3 * per_panel), 4.5 * n_panels), squeeze=False)
    for i, ax in enumerate(axes[:, 0]):
        panel = names[i * per_panel : (i + 1) * per_panel]
        for k, method in enumerate(methods):
            xs = np.arange(len(panel)) + k * width
            ys = [rows[c][method] if rows[c][method] is not None else np.nan for c in panel]
            ci = [rows[c]["ci95"].get(method, (np.nan, np.nan)) for c in panel]
            err = np.array([[y - lo, hi - y] for y, (lo, hi) in zip(ys, ci)]).T
            ax.bar(xs, ys, width, yerr=err, capsize=2, label=method)
        ax.set_xticks(np.arange(len(panel)) + 0.4 - width / 2, panel, rotation=30, ha="right")
        ax.set_ylabel("alignment (1 - JS distance)")
        ax.set_ylim(0.3, 1.0)
        ax.set_xlim(-0.5, per_panel - 0.1)  # the last, shorter row keeps the others' bar widths
    axes[0, 0].set_title(f"Alignment with survey answers ({report.get('split', '')} split)")
    axes[0, 0].legend(ncol=len(methods), fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    """Write the JSON report and its PNG chart beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return out, plot_report(report, out.with_suffix(".png"))
