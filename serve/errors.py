"""ApiError: an error a client gets as JSON, `{"error": "<one line>"}`, with its HTTP status."""

from __future__ import annotations


class ApiError(Exception):
    """An error the client caused (or may retry), answered as `{"error": message}` with its status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers
