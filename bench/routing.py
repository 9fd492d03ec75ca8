"""How well routing reads a profile: top-1 accuracy, the committee's weight on the right culture, and the time
a routed request spends routing, over the profiles of bench/routing_profiles.py.

The experts are the demo's twelve (the twelve most-surveyed cultures but Canada and Australia, held out); every
other culture of the survey file is answered by its survey-similarity committee, as `shores serve` answers it.
A profile is right when routing finds its culture (a held-out culture gets the committee `culture` would get),
or, when nothing is found, when the embedding's top expert is its culture. Routing runs as the router runs it
(`workers/routing.py`, then `TextRouter` where nothing is found), in this process, without HTTP. Beside it,
`embedding_only` is the router before it read places: the embedding for every profile.

    python -m bench.routing --out runs/bench/routing.json
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np

from bench.common import DATA, machine, write_report
from bench.routing_profiles import Profile, profiles
from orchestrator.survey.loading import load_survey
from orchestrator.survey.similarity import similarity_table
from workers.committees import Committee, TextRouter, culture_committee
from workers.cultures import CultureIndex
from workers.places import PlaceIndex
from workers.prompts import persona_text
from workers.routing import read_text

DEMO_EXPERTS = [
    "Germany",
    "United States",
    "United Kingdom",
    "Nigeria",
    "Indonesia",
    "Kenya",
    "Jordan",
    "Russia",
    "Brazil",
    "Mexico",
    "South Korea",
    "Pakistan",
]


def weight_on(committee: Committee, truth: Committee) -> float:
    """The committee's weight on the right culture: the overlap of two committees (1 when they are equal)."""
    right = dict(truth.members)
    return sum(min(w, right.get(c, 0.0)) for c, w in committee.members)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", nargs="+", default=DEMO_EXPERTS)
    parser.add_argument("--limit", type=int, default=None, help="the first N profiles only (a smoke run)")
    parser.add_argument("--k", type=int, default=3, help="committee size")
    parser.add_argument("--temperature", type=float, default=0.05, help="the committees' softmax temperature")
    parser.add_argument("--out", default="runs/bench/routing.json")
    args = parser.parse_args()

    records, _ = load_survey(DATA)
    known = sorted({r.culture for r in records})
    similarity = similarity_table(records, known, args.experts)
    names = CultureIndex(args.experts + known)
    descriptors = {c: persona_text(c) for c in args.experts}
    started = time.perf_counter()
    places = PlaceIndex()
    build_s = time.perf_counter() - started
    embedder = TextRouter()

    def committee_of(culture: str) -> Committee:
        return culture_committee(culture, args.experts, similarity, args.k, args.temperature)

    rows = []
    chosen: list[Profile] = profiles()[: args.limit]
    for profile in chosen:
        started = time.perf_counter()
        routing = read_text(profile.text, places, names)
        if routing.found is not None:
            committee = committee_of(routing.found)
        else:
            committee = embedder.committee(profile.text, descriptors, args.k, args.temperature)
        seconds = time.perf_counter() - started
        top = routing.found or committee.members[0][0]
        # What the router did before it read places: the embedding alone, for every profile.
        alone = embedder.committee(profile.text, descriptors, args.k, args.temperature)
        rows.append(
            {
                "text": profile.text,
                "culture": profile.culture,
                "cue": profile.cue,
                "language": profile.language,
                "found": top,
                "method": routing.method,
                "evidence": routing.evidence,
                "right": top == profile.culture,
                "weight": weight_on(committee, committee_of(profile.culture)),
                "ms": 1000 * seconds,
                "embedding_right": alone.members[0][0] == profile.culture,
                "embedding_weight": weight_on(alone, committee_of(profile.culture)),
            }
        )

    def summary(group: list[dict], prefix: str = "") -> dict:
        return {
            "profiles": len(group),
            "top1": round(float(np.mean([r[prefix + "right"] for r in group])), 3),
            "weight_on_right": round(float(np.mean([r[prefix + "weight"] for r in group])), 3),
        }

    by: dict[str, dict[str, list[dict]]] = {"cue": defaultdict(list), "language": defaultdict(list)}
    for r in rows:
        by["cue"][r["cue"]].append(r)
        by["language"][r["language"]].append(r)
    explicit = [r for r in rows if r["cue"] in ("country", "nationality", "city", "region")]
    ms = np.array([r["ms"] for r in rows])
    report = {
        "machine": machine(),
        "experts": args.experts,
        "profiles": len(rows),
        "cultures": len({r["culture"] for r in rows}),
        "languages": len({r["language"] for r in rows}),
        "overall": summary(rows),
        "explicit_cue": summary(explicit),
        "by_cue": {k: summary(v) for k, v in sorted(by["cue"].items())},
        "embedding_only": {
            "overall": summary(rows, "embedding_"),
            "explicit_cue": summary(explicit, "embedding_"),
            "by_cue": {k: summary(v, "embedding_") for k, v in sorted(by["cue"].items())},
        },
        "by_language": {k: summary(v) for k, v in sorted(by["language"].items())},
        "by_method": {m: sum(r["method"] == m for r in rows) for m in ("place", "language", "embedding")},
        "ms_per_request": {
            "mean": round(float(ms.mean()), 3),
            "p50": round(float(np.percentile(ms, 50)), 3),
            "p99": round(float(np.percentile(ms, 99)), 3),
            "max": round(float(ms.max()), 3),
        },
        "index_build_s": round(build_s, 2),
        "misses": [
            {k: r[k] for k in ("text", "culture", "cue", "found", "method", "evidence")}
            for r in rows
            if not r["right"]
        ],
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
