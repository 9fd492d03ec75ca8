"""Alignment reports: every method scored on the same survey records, per culture and overall."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from orchestrator.experiment import encode
from orchestrator.survey import ExperimentData, SurveyRecord, normalise_question
from workers.base_model import FrozenBase
from workers.committees import Committee
from workers.prompts import NO_EXPERT, Expert, bank_from_experts
from workers.scoring import alignment, bootstrap_ci, option_distributions
from workers.settings import EVAL_BATCH_SIZE, MAX_LENGTH

METHODS = ("base", "persona", "expert", "committee", "uniform", "agnostic")


def agnostic_distribution(record: SurveyRecord, others: dict[str, list[SurveyRecord]]) -> np.ndarray | None:
    """The mean distribution of the other cultures for the same question and options: culture-blind best."""
    peers = [r for r in others.get(normalise_question(record.question), []) if r.culture != record.culture]
    peers = [r for r in peers if r.options == record.options]
    return np.mean([r.distribution for r in peers], axis=0) if peers else None


def evaluate(
    base: FrozenBase,
    experts: list[Expert],
    data: ExperimentData,
    split: str,
    cultures: list[str],
    committees: dict[str, Committee] | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    max_length: int = MAX_LENGTH,
    n_bootstrap: int = 1000,
) -> dict:
    """Score base, persona, expert, committee, uniform and agnostic on each culture's records in a split."""
    bank = bank_from_experts(experts, base.device) if experts else None
    index = {e.meta.culture: i for i, e in enumerate(experts)}
    committees = committees or {c: Committee([(c, 1.0)]) for c in cultures if c in index}
    by_question = defaultdict(list)
    for record in data.records:
        by_question[normalise_question(record.question)].append(record)

    per_culture = data.records_of(split, cultures)
    records = [r for c in cultures for r in per_culture[c]]
    plain, persona = encode(base, records, max_length), encode(base, records, max_length, persona=True)
    # One batched pass for base, persona and every expert any committee needs: rows carry their own expert.
    questions = plain + persona
    expert_idx = [NO_EXPERT] * len(questions)
    member_rows = []
    for i, r in enumerate(records):
        for member in committees[r.culture].cultures if r.culture in committees else []:
            member_rows.append((i, member))
            questions.append(plain[i])
            expert_idx.append(index[member])
    dists = option_distributions(
        base, bank, questions, expert_idx, batch_size, progress=f"eval {split} ({len(questions)} rows)"
    )
    n = len(records)
    base_d, persona_d, member_d = dists[:n], dists[n : 2 * n], dists[2 * n :]
    members = defaultdict(dict)
    for (i, culture), d in zip(member_rows, member_d):
        members[i][culture] = d

    scores: dict[str, dict[str, list[float]]] = {c: defaultdict(list) for c in cultures}
    for i, record in enumerate(records):
        survey = np.asarray(record.distribution)
        row = scores[record.culture]
        row["base"].append(alignment(base_d[i], survey))
        row["persona"].append(alignment(persona_d[i], survey))
        row["uniform"].append(alignment(np.full(len(survey), 1 / len(survey)), survey))
        if record.culture in index:
            row["expert"].append(alignment(members[i][record.culture], survey))
        if record.culture in committees:
            mix = sum(w * members[i][m] for m, w in committees[record.culture].members)
            row["committee"].append(alignment(mix, survey))
        agnostic = agnostic_distribution(record, by_question)
        if agnostic is not None:
            row["agnostic"].append(alignment(agnostic, survey))
    report = {"cultures": {c: _summarise(scores[c], len(per_culture[c]), n_bootstrap) for c in cultures}}
    overall: dict[str, list[float]] = defaultdict(list)
    for c in cultures:
        for method, values in scores[c].items():
            overall[method] += values
    report["overall"] = _summarise(overall, len(records), n_bootstrap)
    # Cultures with no expert of their own, answered by committees of other cultures' experts.
    held_out = [c for c in cultures if c not in index]
    if held_out:
        pooled: dict[str, list[float]] = defaultdict(list)
        for c in held_out:
            for method, values in scores[c].items():
                pooled[method] += values
        report["held_out"] = _summarise(pooled, sum(len(per_culture[c]) for c in held_out), n_bootstrap)
        report["held_out"]["cultures"] = held_out
    report["split"] = split
    report["experts"] = {e.meta.culture: e.meta.training for e in experts}
    return report


def _summarise(scores: dict[str, list[float]], n: int, n_bootstrap: int) -> dict:
    out: dict = {"n": n}
    for method in METHODS:
        values = scores.get(method, [])
        out[method] = float(np.mean(values)) if values else None
    out["ci95"] = {m: bootstrap_ci(v, n_bootstrap) for m, v in scores.items() if v}
    return out


def format_table(report: dict) -> str:
    """The report as a fixed-width text table: one row a culture, one column a method."""
    header = f"{'culture':<24}{'n':>5}" + "".join(f"{m:>11}" for m in METHODS)
    lines = [header, "-" * len(header)]
    rows = list(report["cultures"].items()) + [("overall", report["overall"])]
    if "held_out" in report:
        rows.append(("held-out cultures", report["held_out"]))
    for name, row in rows:
        cells = "".join(f"{row[m]:>11.3f}" if row[m] is not None else f"{'-':>11}" for m in METHODS)
        lines.append(f"{name:<24}{row['n']:>5}{cells}")
    return "\n".join(lines)


def plot_report(report: dict, path: Path) -> Path:
    """A grouped bar chart of alignment per culture and method, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["cultures"]) + ["overall"]
    rows = [report["cultures"][c] for c in names[:-1]] + [report["overall"]]
    methods = [m for m in METHODS if any(r[m] is not None for r in rows)]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names)), 4.5))
    for k, method in enumerate(methods):
        xs = np.arange(len(names)) + k * width
        ys = [r[method] if r[method] is not None else np.nan for r in rows]
        ci = [r["ci95"].get(method, (np.nan, np.nan)) for r in rows]
        err = np.array([[y - lo, hi - y] for y, (lo, hi) in zip(ys, ci)]).T
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=method)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=30, ha="right")
    ax.set_ylabel("alignment (1 - JS distance)")
    ax.set_ylim(0.3, 1.0)
    ax.set_title(f"Alignment with survey answers ({report.get('split', '')} split)")
    ax.legend(ncol=len(methods), fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    """Write the JSON report and its PNG chart beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return out, plot_report(report, out.with_suffix(".png"))
