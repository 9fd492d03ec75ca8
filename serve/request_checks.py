"""The checks a request passes before it is routed, as functions of its headers and body.

The router runs them on every request. The edge (serve/edge.py) runs the same ones in Serve's HTTP proxy, so a
request it refuses gets the router's answer, word for word. Each returns the ApiError to answer, or None.
"""

from __future__ import annotations

import hashlib
import hmac

from pydantic import BaseModel

from serve.errors import ApiError
from serve.exposure import host_name
from serve.routes import JSON
from serve.settings import LimitsSection


def host_refusal(header: str | None, hosts: frozenset[str] | None) -> ApiError | None:
    """A 400 for a Host header missing or malformed, a 421 for one not in `hosts` (DNS rebinding); None when
    `hosts` is None (any name goes)."""
    if hosts is None:
        return None
    name = host_name(header) if header is not None else None
    if name is None:
        return ApiError(400, "missing or malformed Host header")
    if name not in hosts:
        return ApiError(421, f"Host {name!r} is not served here (serve.auth.allowed_hosts)")
    return None


def key_digest(key: str) -> bytes:
    """What is compared: the key's SHA-256, so the edge can check keys without holding the key."""
    return hashlib.sha256(key.encode()).digest()


def bearer_refusal(header: str, digest: bytes | None) -> ApiError | None:
    """A 401 unless the Authorization header carries the key whose digest is `digest` (None: no key needed)."""
    if digest is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key_digest(token.strip()), digest):
        return ApiError(401, "missing or wrong bearer token (Authorization: Bearer <key>)")
    return None


def media_type_refusal(declared: str) -> ApiError | None:
    """A 415 unless the Content-Type is JSON in UTF-8: a web page can send text/plain to any origin without
    asking first; JSON it cannot (CORS)."""
    media, _, parameters = declared.partition(";")
    charset = (
        parameters.strip().lower().removeprefix("charset=").strip('"') if parameters.strip() else "utf-8"
    )
    if media.strip().lower() != JSON or charset not in ("utf-8", "utf8"):
        return ApiError(415, f"the body must be sent as Content-Type: {JSON} (got {declared[:80]!r})")
    return None


def text_refusal(data: object) -> ApiError | None:
    """A 400 if a string of the parsed body holds a lone surrogate (`"\\ud800"`): JSON allows the escape, but
    it is no text, and the tokenizers and the sentence embedder fail on it."""
    pending = [data]
    while pending:  # not recursive: bodies may nest deeply
        item = pending.pop()
        if isinstance(item, dict):
            pending += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            pending += item
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return ApiError(400, "malformed JSON: a string holds a lone surrogate (\\ud800-\\udfff)")
    return None


def limit_refusal(body: BaseModel, limits: LimitsSection) -> ApiError | None:
    """A 422 for a body over one of serve.limits' caps: its committee_size, options or max_new_tokens."""
    asked, cap = getattr(body, "committee_size", None), limits.max_committee_size
    if asked is not None and asked > cap:
        return ApiError(422, f"committee_size {asked} is over the cap of {cap}")
    options = getattr(body, "options", None)
    if options is not None and len(options) > limits.max_options:
        return ApiError(422, f"too many options: {len(options)} (at most {limits.max_options})")
    return new_tokens_refusal(getattr(body, "max_new_tokens", None), limits)


def new_tokens_refusal(asked: int | None, limits: LimitsSection) -> ApiError | None:
    """A 422 for more new tokens than serve.limits.max_new_tokens."""
    if asked is not None and asked > limits.max_new_tokens:
        return ApiError(422, f"max_new_tokens {asked} is over the cap of {limits.max_new_tokens}")
    return None


def unknown_culture(culture: str, experts: int) -> ApiError:
    """The 404 for a culture name that no expert and no survey similarity answers."""
    return ApiError(
        404, f"unknown culture {culture!r}: no expert, and no survey similarity to the {experts} experts"
    )


def new_tokens(asked: int | None, limits: LimitsSection) -> int:
    """The new tokens a request may decode: its own ask under the cap (422 over it), else the default."""
    refusal = new_tokens_refusal(asked, limits)
    if refusal:
        raise refusal
    return asked or limits.default_max_new_tokens
