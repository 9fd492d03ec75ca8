"""What the router publishes for the edge (serve/edge.py), which refuses requests in Serve's proxy as the router
would: the rules it checks requests against (`EdgeRules`, from `Router.edge_rules`), and the header that tells
the edge of a newer experts version. The router knows nothing of the edge; the edge asks the router.
"""

from __future__ import annotations

from dataclasses import dataclass

from serve.settings import LimitsSection

EXPERTS_VERSION_HEADER = (
    "x-shores-experts-version"  # on the router's answers: the catalogue's experts version
)


@dataclass(frozen=True)
class EdgeRules:
    """What the router checks requests against, as the edge needs it."""

    version: str  # the experts version of the router's catalogue
    hosts: frozenset[str] | None  # the Host names served (None: any)
    key_digest: bytes | None  # the API key's SHA-256 (None: no key)
    cors: bool  # CORS is on: cross-origin requests are left to the router, which answers with its headers
    limits: LimitsSection
    cultures: tuple[str, ...]  # the names a culture may resolve to: the experts' and the similarity table's
    experts: int
