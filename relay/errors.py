"""The relay's exceptions, drawn once here.

RelayError
├── ConfigError             a setting is missing or bad; start-up stops and names the variable
├── ApiError                an HTTP error the API answers with `{"error": ...}` (status, message)
│   ├── UpstreamError       Chamelaion answered with an error or could not be reached
│   ├── CallbackUrlRejected a callback URL fails its syntax or network-policy check (422)
│   └── NotReplicated       a new job is recorded, but no Redis replica confirmed it in time
└── DestinationRefused      at delivery, the network policy refused every address of the
                            callback's host; no connection was made (also an httpx.ConnectError,
                            so the callback transport can raise it where httpx expects one)

Third-party errors (httpx, redis) are mapped to these at the boundary that meets them, chained
with `from exc`, so nothing above that boundary needs to know which library failed.
"""

from __future__ import annotations

from typing import Any

import httpx


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


# For an answer given before the request's body was read to its end: the rest of the body
# would otherwise keep the connection busy (and a slow sender keeps sending it).
CLOSE = {"connection": "close"}


class UpstreamError(ApiError):
    """Chamelaion failed or refused; the status and message are what the relay's caller gets."""


class CallbackUrlRejected(ApiError):
    """The callback URL fails a syntax or network-policy check (HTTP 422).

    `reason` never contains the URL's path, query or credentials; it may name the host.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(422, f"callback_url refused: {reason}")
        self.reason = reason


class DestinationRefused(httpx.ConnectError, RelayError):
    """The network policy refused the callback's destination; no connection was made."""

    def __init__(self, reason: str, *, request: httpx.Request | None = None) -> None:
        super().__init__(f"callback destination refused: {reason}", request=request)
        self.reason = reason


class NotReplicated(ApiError):
    """A new job is recorded on the Redis primary, but too few replicas confirmed it (503).

    Not worth retrying: the job exists upstream and is tracked; a resubmission would create a
    second one. `x-should-retry: false` tells the official SDK so.
    """

    def __init__(self, request_id: str, acknowledged: int, wanted: int) -> None:
        super().__init__(
            503,
            f"job {request_id} was created and recorded, but {acknowledged} of {wanted} Redis "
            "replicas confirmed it in time; it is tracked unless the primary fails now. "
            "Do not resubmit: look it up with GET /api/v1/lipsync/requests/{id}",
            headers={"x-should-retry": "false"},
        )
        self.request_id = request_id
