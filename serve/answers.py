"""What every answer shares, shores' own endpoints and the OpenAI-compatible ones alike: the committee as
answers show it (`members`), and server-sent events for streams (`event`, DONE)."""

from __future__ import annotations

import json

from serve.protocol import GenerateAnswer, GenerateStart, OpinionAnswer
from workers.committees import Committee

EVENT_STREAM = "text/event-stream"
DONE = "data: [DONE]\n\n"  # the last server-sent event of a stream, as OpenAI sends it


def event(data: dict) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(data)}\n\n"


def members(committee: Committee, answer: OpinionAnswer | GenerateAnswer | GenerateStart) -> list[dict]:
    """A committee as responses show it: each member's culture, weight and the version that answered."""
    return [
        {"culture": c, "weight": round(w, 6), "version": answer.versions.get(c)} for c, w in committee.members
    ]
