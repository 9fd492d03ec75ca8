"""The HTTP reference, docs/reference/http.md, generated from the router's route table and request models.

`python -m serve.reference` prints it (`make docs` writes it): it builds the router's FastAPI app from
serve/routes.py without Ray, reads its OpenAPI schema, and writes one section per endpoint: method, path,
what it answers, and a table of its request body's fields. tests/test_reference.py fails when the committed
page differs.
"""

from __future__ import annotations

import json
import sys

from fastapi import FastAPI, Request

from serve.openai_fields import HARMLESS, HONOURED, MESSAGE_NO_OP, NO_OP
from serve.routes import JSON, ROUTES, add_routes

PAGE = "http.md"
BOUNDS = (
    ("minimum", "≥"),
    ("exclusiveMinimum", ">"),
    ("maximum", "≤"),
    ("exclusiveMaximum", "<"),
    ("minLength", "length ≥"),
    ("maxLength", "length ≤"),
    ("minItems", "items ≥"),
    ("maxItems", "items ≤"),
)
HEADER = """# HTTP reference

Generated from `serve/routes.py` and `serve/schemas.py` by `make docs`: do not edit by hand. The guide, with
examples, streaming and limits, is [serving.md](../serving.md); the `serve` keys are in [config.md](config.md).

Bodies are JSON, sent with `Content-Type: application/json` (415 otherwise). An error is one line with its
status: `{"error": "..."}` on shores' own endpoints, OpenAI's `{"error": {"message", "type", "param", "code"}}`
on `/v1/chat/completions`, `/v1/completions` and `/v1/models`. Every `/v1` endpoint needs
`Authorization: Bearer <key>` when `serve.auth.api_key_env` is set.
"""


async def _unserved(request: Request) -> None:
    """A stand-in handler: the reference needs the routes' shapes, not their answers."""


def openapi() -> dict:
    """The router's OpenAPI schema, from the same route table the Router serves."""
    api = FastAPI(title="shores")
    add_routes(api, lambda route: _unserved)
    return api.openapi()


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def schema_type(schema: dict) -> str:
    """A readable type for a JSON schema: `integer (≥ 1) | null`, `array[ChatMessage]`, `"a" | "b"`, ..."""
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " | ".join(schema_type(s) for s in schema["anyOf"])
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    kind = schema.get("type", "any")
    if kind == "array" and "items" in schema:
        kind = f"array[{schema_type(schema['items'])}]"
    bounds = [f"{sign} {_number(schema[key])}" for key, sign in BOUNDS if key in schema]
    return kind + (f" ({', '.join(bounds)})" if bounds else "")


def _fields(schema: dict) -> list[str]:
    required = set(schema.get("required", []))
    lines = ["| field | type | required | default | description |", "| --- | --- | --- | --- | --- |"]
    for name, prop in schema.get("properties", {}).items():
        default = f"`{json.dumps(prop['default'])}`" if "default" in prop else ""
        cells = [schema_type(prop), "yes" if name in required else "", default, prop.get("description", "")]
        lines.append(f"| `{name}` | " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def _alternatives(values: list) -> str:
    return " or ".join(f"`{json.dumps(v)}`" for v in values)


def _openai_fields(endpoint: str) -> list[str]:
    """What the OpenAI endpoints do with fields beyond those validated: serve/openai_api.py's tables."""
    refused = ", ".join(f"`{k}` ({_alternatives(NO_OP[k])})" for k in sorted(NO_OP))
    message = ", ".join(f"`{k}` ({_alternatives(MESSAGE_NO_OP[k])})" for k in sorted(MESSAGE_NO_OP))
    return [
        "Every other field is refused with a 400 naming it, as OpenAI answers an unknown one, except:",
        "",
        f"- honoured: {', '.join(f'`{k}`' for k in sorted(HONOURED[endpoint]))};",
        f"- accepted and ignored (they change no output): {', '.join(f'`{k}`' for k in sorted(HARMLESS))};",
        f"- refused unless they hold a value that changes nothing: {refused}"
        + (f"; in a message: {message}." if endpoint == "chat" else "."),
        "",
    ]


def http_page() -> str:
    """The HTTP reference as Markdown."""
    spec = openapi()
    lines = [HEADER, "| method | path | what it does |", "| --- | --- | --- |"]
    lines += [
        f"| {r.method} | [`{r.path}`](#{r.method.lower()}-{_anchor(r.path)}) | {r.summary} |" for r in ROUTES
    ]
    lines.append("")
    for route in ROUTES:
        operation = spec["paths"][route.path][route.method.lower()]
        lines += [f"## {route.method} {route.path}", "", operation["summary"], ""]
        lines += [f"Answer (200): `{operation['responses']['200']['description']}`", ""]
        body = operation.get("requestBody", {}).get("content", {}).get(JSON, {}).get("schema")
        if body is None:
            lines += ["No request body.", ""]
            continue
        lines += [f"Request body (`{body['title']}`):", "", *_fields(body), ""]
        for name, nested in body.get("$defs", {}).items():
            lines += [f"`{name}`:", "", *_fields(nested), ""]
        if route.handler.startswith("openai."):
            lines += _openai_fields("chat" if route.path.endswith("chat/completions") else "completions")
    return "\n".join(lines)


def _anchor(path: str) -> str:
    """GitHub's anchor of a heading `METHOD /a/b_c`: lower case, punctuation but - and _ dropped."""
    return "".join(c for c in path.lower() if c.isalnum() or c in "-_")


if __name__ == "__main__":  # `make docs` writes it to docs/reference/<PAGE>
    sys.stdout.buffer.write(http_page().encode("utf-8"))
