"""The error a request is answered with, in the body OpenAI's API and clients use."""

from __future__ import annotations


class APIError(Exception):
    """A failed request: its HTTP ``status`` and OpenAI's ``{"error": {...}}`` body.

    ``message`` says what was wrong and what would be right; ``param`` names the request field
    at fault (or None); ``type`` and ``code`` are OpenAI's machine-readable kinds.
    """

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str) -> APIError:
    """A 400 for one bad field: ``message`` follows the field's name."""
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")
