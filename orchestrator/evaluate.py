"""Alignment reports: every method scored on the same survey records, per culture and overall."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import numpy as np

from orchestrator.encoding import encode
from orchestrator.survey import (
    ExperimentData,
    SurveyDataError,
    SurveyRecord,
    normalise_question,
    question_programmes,
)
from workers.base_model import FrozenBase
from workers.committees import Committee, culture_committee, prior_weights
from workers.cultures import SHARED, UnknownCultureError, is_shared
from workers.defaults import EVAL_BATCH_SIZE, MAX_LENGTH
from workers.expert_file import Expert
from workers.expert_store import Similarity
from workers.prompts import NO_EXPERT, bank_from_experts
from workers.renderings import AS_WRITTEN, CHAT, RENDERINGS, asked_in_chat
from workers.scoring import (
    alignment,
    bootstrap_ci,
    natural_log_alignment,
    option_answers,
    paired_bootstrap_ci,
)

METHODS = ("base", "persona", SHARED, "expert", "committee", "uniform", "agnostic")
# The methods each rendering reports (the persona and the agnostic oracle: as written only).
RENDERED_METHODS = ("base", SHARED, "expert", "committee", "uniform")
# Paired differences over the same records: is a culture's expert, or its committee, worth more than the
# shared prior; is the expert worth more than the base?
DIFFERENCES = (("expert", SHARED), ("committee", SHARED), ("expert", "base"))
# Answers a chat user samples per question in the chat report (`chat_report`), and the draws of them that
# estimate what such a sample scores.
CHAT_DRAWS = 8
CHAT_REPEATS = 200
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
    """Each record's committee as the router serves its culture: its own expert, else its nearest experts, each
    with its share of the prior; None for a culture with neither."""
    names, weights = [e.meta.culture for e in experts], prior_weights(e.meta for e in experts)

    def committee(record: SurveyRecord) -> Committee | None:
        try:
            return culture_committee(record.culture, names, similarity, k, temperature, weights)
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
    """Score every method of METHODS on each culture's records in a split, and the paired differences; then
    base, shared, expert, committee and uniform on each rendering of the same records (`renderings`), with the
    worst rendering named."""
    own = {e.meta.culture for e in experts if not is_shared(e.meta.culture)}
    committees = committees or served_committees(experts, {}, 1, 1.0)  # each culture's own expert, as served
    per_culture = data.records_of(split, cultures)
    records = [r for c in cultures for r in per_culture[c]]
    if not records:
        raise SurveyDataError(
            f"no records of {', '.join(cultures)} in the {split} split of {data.report.path}"
        )
    wanted = {name: RENDERED_METHODS for name in RENDERINGS} | {AS_WRITTEN: METHODS}
    scored, chat = _scores(
        base, experts, records, [committees(r) for r in records], wanted, batch_size, max_length
    )
    by_question = defaultdict(list)
    for record in data.records:
        by_question[normalise_question(record.question)].append(record)
    for record in records:
        agnostic = agnostic_distribution(record, by_question)
        if agnostic is not None:
            scored[AS_WRITTEN][record.culture]["agnostic"].append(alignment(agnostic, record.distribution))

    def section(scores: dict[str, dict[str, list[float]]]) -> dict:
        out = {"cultures": {c: _summarise(scores[c], len(per_culture[c]), n_bootstrap) for c in cultures}}
        # Pooled differences pair records of the cultures with experts only: the others have no expert score.
        with_experts = _pool(scores, [c for c in cultures if c in own])
        out["overall"] = _summarise(_pool(scores, cultures), len(records), n_bootstrap, paired=with_experts)
        # Cultures with no expert of their own, answered by committees of other cultures' experts.
        held_out = [c for c in cultures if c not in own]
        if held_out:
            pooled = _pool(scores, held_out)
            out["held_out"] = _summarise(pooled, sum(len(per_culture[c]) for c in held_out), n_bootstrap)
            out["held_out"]["cultures"] = held_out
        return out

    # Which survey programme each question comes from (read from its codes), to pool each rendering by programme.
    programme_of = question_programmes(data.records)
    trained = [c for c in cultures if c in own]
    programmes = {c: [programme_of[normalise_question(r.question)] for r in per_culture[c]] for c in trained}

    def pooled_with_experts(scores: dict[str, dict[str, list[float]]]) -> dict:
        """The records of the cultures with experts pooled (`with_experts`), and pooled by programme."""
        pooled: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for c in trained:
            for method, values in scores[c].items():
                if len(values) == len(programmes[c]):  # a score every record: pairs stay paired
                    for programme, value in zip(programmes[c], values):
                        pooled[programme][method].append(value)
                        pooled[""][method].append(value)
        summaries = {p: _summarise(v, len(v["uniform"]), n_bootstrap) for p, v in sorted(pooled.items())}
        return {"with_experts": summaries.pop("", None), "by_programme": summaries}

    report = section(scored[AS_WRITTEN])
    report["renderings"] = {
        name: section(scored[name]) | pooled_with_experts(scored[name]) for name in RENDERINGS
    }
    report["worst_rendering"] = worst_renderings(report["renderings"])
    report["chat"] = chat_report(report["renderings"], _pool(chat, trained))
    report["split"] = split
    report["experts"] = {e.meta.culture: e.meta.training for e in experts}
    report["prior_weights"] = {e.meta.culture: e.meta.prior_weight for e in experts if e.meta.prior_weight}
    return report


def _scores(
    base: FrozenBase,
    experts: list[Expert],
    records: list[SurveyRecord],
    served: list[Committee | None],
    wanted: dict[str, tuple[str, ...]],
    batch_size: int,
    max_length: int,
) -> tuple[dict[str, dict[str, dict[str, list[float]]]], dict[str, dict[str, list[float]]]]:
    """Per rendering, culture and method, the records' alignments: every rendering's rows in one batched pass
    (a row the renderings share, a question one leaves as written, runs once). And per culture with an
    expert, what a chat user gets (`chat_report`): the mass each answer puts on the options, and what
    CHAT_DRAWS sampled answers score in a chat, on the opinion path, and drawn from the survey itself."""
    bank = bank_from_experts(experts, base.device) if experts else None
    index = {e.meta.culture: i for i, e in enumerate(experts)}
    # The shared prior is scored on every record, and is no culture's own expert.
    shared = next((i for c, i in index.items() if is_shared(c)), None)
    questions, expert_idx, asked = [], [], []
    for name, methods in wanted.items():
        plain = encode(base, records, max_length, shown=name)
        persona = encode(base, records, max_length, persona=True, shown=name) if "persona" in methods else []
        for i, record in enumerate(records):
            rows = {}
            columns = [("base", NO_EXPERT, plain), ("persona", NO_EXPERT, persona), (SHARED, shared, plain)]
            members = served[i].cultures if served[i] is not None else []
            # The prior as a member answers with its column's own row: the same numbers.
            columns += [(m, index[m], plain) for m in members if m != SHARED or shared is None]
            for key, expert, encoded in columns:
                if (key in methods or key in members) and expert is not None and encoded:
                    rows[key] = len(questions)
                    questions.append(encoded[i])
                    expert_idx.append(expert)
            asked.append((name, i, record, plain[i], rows))
    dists, masses = option_answers(
        base, bank, questions, expert_idx, batch_size, progress=f"eval ({len(questions)} rows)"
    )
    scores = {name: {r.culture: defaultdict(list) for r in records} for name in wanted}
    chat: dict[str, dict[str, list[float]]] = {r.culture: defaultdict(list) for r in records}
    answers: dict[tuple[str, int], tuple[np.ndarray, float]] = {}  # (rendering, record): as served, mass
    for (name, i, record, question, rows), committee in zip(asked, served * len(wanted)):
        survey, row = np.asarray(question.target), scores[name][record.culture]
        for method in ("base", "persona", SHARED):
            if method in rows and method in wanted[name]:
                row[method].append(alignment(dists[rows[method]], survey))
        row["uniform"].append(alignment(np.full(len(survey), 1 / len(survey)), survey))
        if committee is not None:
            # A culture's own committee is its expert as served: with its share of the prior, if any. A chat
            # mixes the members' whole next-token distributions, so each member weighs by its mass on options.
            weights = {m: w * (masses[rows[m]] if asked_in_chat(name) else 1.0) for m, w in committee.members}
            mix = sum(weights[m] * dists[rows[m]] for m in weights) / sum(weights.values())
            row["committee"].append(alignment(mix, survey))
            if record.culture in index and not is_shared(record.culture):
                row["expert"].append(row["committee"][-1])
                answers[(name, i)] = mix, sum(w * masses[rows[m]] for m, w in committee.members)
        if asked_in_chat(name) and (name, i) in answers:
            mine = chat[record.culture]
            for method in ("base", SHARED):
                if method in rows:
                    mine[f"mass.{method}"].append(masses[rows[method]])
            mine["mass.expert"].append(answers[(name, i)][1])
    for (name, i), (answer, mass) in answers.items():
        if asked_in_chat(name) and (AS_WRITTEN, i) in answers:
            record = records[i]
            survey = np.asarray(record.distribution)
            mine = chat[record.culture]
            mine["sampled.chat"].append(sampled_alignment(answer, mass, survey, seed=i))
            mine["sampled.opinion"].append(
                sampled_alignment(answers[(AS_WRITTEN, i)][0], 1.0, survey, seed=i)
            )
            mine["sampled.survey"].append(sampled_alignment(survey, 1.0, survey, seed=i))
    return scores, chat


def sampled_alignment(
    answer: np.ndarray, mass: float, survey: np.ndarray, seed: int, draws: int = CHAT_DRAWS
) -> float:
    """What `draws` sampled answers score, on average over CHAT_REPEATS samples: each answer an option with
    the probability `mass * answer`, else no option at all; the options drawn, counted, are the answer
    (alignment 0 where none was drawn)."""
    probs = np.append(np.asarray(answer, float) * mass, max(0.0, 1.0 - mass))
    counts = np.random.default_rng(seed).multinomial(draws, probs / probs.sum(), size=CHAT_REPEATS)[:, :-1]
    return float(np.mean([alignment(c / c.sum(), survey) if c.sum() else 0.0 for c in counts]))


def chat_report(renderings: dict[str, dict], chat: dict[str, list[float]]) -> dict | None:
    """What a chat user gets, pooled over the cultures with experts: the first token's alignment as a chat
    asks (`chat` rendering) beside the opinion path's (as written), each expert's gain over the base, and the
    chat's share of the opinion path's gain; the mass on the options; what CHAT_DRAWS sampled answers score."""
    first, opinion = renderings[CHAT]["with_experts"], renderings[AS_WRITTEN]["with_experts"]
    if not first or not opinion or not chat.get("mass.expert"):
        return None
    chat_gain, opinion_gain = first["expert"] - first["base"], opinion["expert"] - opinion["base"]
    return {
        "n": len(chat["mass.expert"]),
        "first_token": {"base": first["base"], "expert": first["expert"], "gain": chat_gain},
        "opinion": {"base": opinion["base"], "expert": opinion["expert"], "gain": opinion_gain},
        "gain_ratio": chat_gain / opinion_gain if opinion_gain > 0 else None,
        "mass_on_options": {
            m: float(np.mean(chat[f"mass.{m}"])) for m in ("base", SHARED, "expert") if chat[f"mass.{m}"]
        },
        "sampled": {
            "draws": CHAT_DRAWS,
            **{path: float(np.mean(chat[f"sampled.{path}"])) for path in ("chat", "opinion", "survey")},
        },
    }


def worst_renderings(sections: dict[str, dict]) -> dict[str, str | None]:
    """The rendering where the experts (`expert`) and the held-out cultures' committees (`committee`) gain
    least over the shared prior: the one that counts."""
    out = {}
    for key, part, column in (("expert", "overall", "expert"), ("committee", "held_out", "committee")):
        gains = {
            name: diff["mean"]
            for name, s in sections.items()
            if (diff := s.get(part, {}).get("differences", {}).get(f"{column}-{SHARED}"))
        }
        out[key] = min(gains, key=gains.get) if gains else None
    return out


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
        kept = ("split", "cultures", "overall", "held_out", "renderings", "worst_rendering")
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
