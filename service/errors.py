"""The one error type handlers raise: an HTTP status, a one-line message, optional headers.

Every non-200 answer is ``{"error": message}`` (what tritonclient and KServe clients parse).
"""

from __future__ import annotations


class ServiceError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def bad_request(message: str) -> ServiceError:
    return ServiceError(400, message)
