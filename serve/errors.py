"""ApiError: an error a client gets as JSON with its HTTP status, in one line.

shores' own endpoints answer `{"error": "<message>"}`; the OpenAI-compatible ones answer OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, which OpenAI's clients read (`param` names the field at
fault, `code` is the status).
"""

from __future__ import annotations

OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models")


class ApiError(Exception):
    """An error the client caused (or may retry), answered with its status; `param` names the field at fault."""

    def __init__(
        self, status: int, message: str, headers: dict[str, str] | None = None, param: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.headers, self.param = status, message, headers, param


def error_body(path: str, status: int, message: str, param: str | None = None) -> dict:
    """The JSON of an error answered on `path`: shores' shape, or OpenAI's on the OpenAI-compatible paths."""
    if path not in OPENAI_PATHS:
        return {"error": message}
    kind = (
        "authentication_error"
        if status == 401
        else "invalid_request_error"
        if status < 500
        else "server_error"
    )
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}
