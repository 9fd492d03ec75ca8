"""Reading a request's body: JSON only, under the size cap, parsed and validated into its schema, every failure
one ApiError (415, 413, 400, 422).

Bodies are read and parsed here, not by FastAPI's automatic parsing, so that the size cap holds before any JSON
is parsed and every error has the same one-line shape.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from serve.errors import ApiError
from serve.request_checks import limit_refusal, media_type_refusal, text_refusal
from serve.settings import LimitsSection

Body = TypeVar("Body", bound=BaseModel)


async def read_body(
    request: Request, schema: type[Body], limits: LimitsSection, check: Callable[[dict], None] | None = None
) -> Body:
    """The request's JSON body as `schema`: 415 if not declared JSON, 413 over the size cap, 400 if not JSON (or
    refused by `check`), 422 if invalid or over one of `limits`' caps."""
    data = await read_json(request, limits.max_body_bytes)
    if check is not None:
        check(data)
    try:
        body = schema.model_validate(data)
    except ValidationError as err:
        where = err.errors()[0]["loc"]
        raise ApiError(422, first_error(err), param=str(where[0]) if where else None) from None
    except RecursionError:
        raise ApiError(400, "the body is nested too deeply") from None
    refusal = limit_refusal(body, limits)
    if refusal:
        raise refusal
    return body


async def read_json(request: Request, cap: int) -> dict:
    """The request's body, a JSON object of at most `cap` bytes, declared as JSON, its strings all text."""
    refusal = media_type_refusal(request.headers.get("content-type", ""))
    if refusal:
        raise refusal
    length = request.headers.get("content-length", "0")
    if not length.isdigit():
        raise ApiError(400, "bad Content-Length header")
    if int(length) > cap:
        raise ApiError(413, f"request body of {length} bytes is over the cap of {cap}")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > cap:
            raise ApiError(413, f"request body is over the cap of {cap} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"malformed JSON: {err}") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    refusal = text_refusal(data)
    if refusal:
        raise refusal
    return data


def first_error(err: ValidationError) -> str:
    """A validation error as one line: where the first error is, what it is, and how many more there are."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"
