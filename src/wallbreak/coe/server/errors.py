"""The one exception the HTTP layer raises for a request it cannot serve: it becomes OpenAI's error
body with its status (`app`)."""

from __future__ import annotations


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}
