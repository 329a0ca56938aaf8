"""The relay's exceptions, drawn once here.

RelayError
├── ConfigError        a setting is missing or bad; start-up stops and names the variable
└── ApiError           an HTTP error the API answers with `{"error": ...}` (status, message)
    └── UpstreamError  Chamelaion answered with an error or could not be reached

Third-party errors (httpx, redis) are mapped to these at the boundary that meets them, chained
with `from exc`, so nothing above that boundary needs to know which library failed.
"""

from __future__ import annotations

from typing import Any


class RelayError(Exception):
    """Base of every error the relay raises on purpose."""


class ConfigError(RelayError):
    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable} {problem}")
        self.variable = variable
        self.problem = problem


class ApiError(RelayError):
    """An error with an HTTP status and a message that is safe to show to the caller."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        details: list[Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.details = details
        self.headers = headers or {}


class UpstreamError(ApiError):
    """Chamelaion failed or refused; `upstream_status` is what it said (None: unreachable)."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        upstream_status: int | None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status_code, message, headers=headers)
        self.upstream_status = upstream_status
        self.retry_after = retry_after
