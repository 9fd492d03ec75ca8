"""An alignment report as people read it: the console tables, the chart, the JSON and PNG files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from orchestrator.evaluate import DIFFERENCES, METHODS
from workers.cultures import SHARED

PLOT_ROW = 16  # cultures a row of the report's chart


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
    if "renderings" in report:
        lines += ["", *format_renderings(report)]
    if report.get("chat"):
        lines += ["", *format_chat(report["chat"])]
    if "transfer" in report:
        section = report["transfer"]
        title = f"transfer split: {section['split']} ({section['hold_out']} questions, held out of training)"
        lines += ["", title, "=" * len(title), format_table(section)]
    return "\n".join(lines)


def format_renderings(report: dict) -> list[str]:
    """One row a rendering: pooled alignment of the cultures with experts, the paired gain over the prior, the
    experts whose interval lies below 0, and the held-out cultures' committees' gain; then the same pooled by
    survey programme; the worst rendering named."""
    worst = report.get("worst_rendering", {})
    title = (
        f"renderings (the worst counts: experts {worst.get('expert')}, committees {worst.get('committee')})"
    )
    header = (
        f"{'rendering':<24}{'n':>5}"
        + "".join(f"{m:>9}" for m in ("base", SHARED, "expert", "uniform"))
        + f"{'expert - shared':>28}  {'below 0':<8}{'committee - shared':>28}"
    )
    lines = [title, header, "-" * len(header)]

    def pooled(label: str, row: dict) -> str:
        means = "".join(_cell(row[m], 9) for m in ("base", SHARED, "expert", "uniform"))
        return f"{label:<24}{row['n']:>5}{means}" + _difference_cell(
            row["differences"].get(f"expert-{SHARED}")
        )

    for name, section in report["renderings"].items():
        below = [
            c
            for c, row in section["cultures"].items()
            if (d := row["differences"].get(f"expert-{SHARED}")) and d["ci95"][1] < 0
        ]
        held = section.get("held_out", {}).get("differences", {}).get(f"committee-{SHARED}")
        overall = section["with_experts"] or section["overall"]
        lines.append(pooled(name, overall) + f"  {len(below):<8}" + _difference_cell(held))
        if below:
            lines.append(f"{'':<29}below the prior: {', '.join(below)}")
        lines += [pooled(f"  {p} questions", row) for p, row in section.get("by_programme", {}).items()]
    return lines


def format_chat(chat: dict) -> list[str]:
    """What a chat user gets beside the opinion path, pooled over the cultures with experts."""
    first, opinion, sampled = chat["first_token"], chat["opinion"], chat["sampled"]
    ratio = f"{chat['gain_ratio']:.2f}" if chat["gain_ratio"] is not None else "-"
    mass = ", ".join(f"{m} {v:.3f}" for m, v in chat["mass_on_options"].items())
    return [
        f"the chat path ({chat['n']} records of the cultures with experts)",
        f"  first token, as a chat asks: base {first['base']:.3f}, expert {first['expert']:.3f}, "
        f"gain {first['gain']:+.3f} = {ratio} of the opinion path's {opinion['gain']:+.3f}",
        f"  the first token's mass on the options: {mass}",
        f"  {sampled['draws']} sampled answers score: chat {sampled['chat']:.3f}, opinion path "
        f"{sampled['opinion']:.3f}, the survey's own {sampled['survey']:.3f}",
    ]


def _cell(value: float | None, width: int = 11) -> str:
    return f"{value:>{width}.3f}" if value is not None else f"{'-':>{width}}"


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
