"""How the API answers: JSON bytes passed through as they are, and `{"error": ...}` for errors."""

from __future__ import annotations

import logging
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from relay.errors import ApiError

log = logging.getLogger(__name__)


def json_bytes(body: bytes, headers: dict[str, str] | None = None) -> Response:
    """A 200 with JSON the relay already holds as bytes (no re-encoding)."""
    return Response(body, media_type="application/json", headers=headers)


class JobCreated(Response):
    """A submission's answer (JSON bytes, as json_bytes) for a job it has just started tracking:
    not ended and not read from Chamelaion yet, so `Prefer: wait` need not read it
    (relay.api.waiting)."""

    def __init__(self, body: bytes, request_id: str) -> None:
        super().__init__(body, media_type="application/json")
        self.request_id = request_id


# Entries of `details` an error answer lists at most: a body of 80,000 unknown fields is
# 80,000 validation errors, and naming them all made a 5 MB answer from a 1 MB request.
MAX_DETAILS = 20


def error_content(exc: ApiError) -> dict[str, Any]:
    """`{"error": ..., "details": [...]}`, with at most MAX_DETAILS details and, when there
    were more, how many were left out (`details_omitted`)."""
    content: dict[str, Any] = {"error": exc.message}
    if exc.details:
        content["details"] = exc.details[:MAX_DETAILS]
        if len(exc.details) > MAX_DETAILS:
            content["details_omitted"] = len(exc.details) - MAX_DETAILS
    return content


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(error_content(exc), exc.status_code, headers=exc.headers)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)


async def client_disconnected(request: Request, exc: Exception) -> Response:
    # The caller hung up before its body was all sent: its doing, not the relay's, so a 4xx
    # (which nobody reads) rather than a 500 with a traceback that would page someone.
    assert isinstance(exc, ClientDisconnect)
    log.info("caller disconnected mid-body on %s %s", request.method, request.url.path)
    return JSONResponse({"error": "the caller disconnected before the body was complete"}, 400)


async def unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": "internal error"}, 500)
