"""Reading a caller's body within a size limit (413 as soon as it is known to be too big) and a
time limit (408 when it has not all come within RELAY_HTTP_BODY_TIMEOUT)."""

from __future__ import annotations

import asyncio

from starlette.requests import Request

from relay.api.protocol import body_received
from relay.api.state import app_state
from relay.errors import CLOSE, ApiError


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than {limit} bytes")


def declared_length(request: Request, limit: int) -> int | None:
    """The Content-Length the caller declared (None if absent or odd); 413 when over `limit`."""
    value = request.headers.get("content-length")
    declared = int(value) if value is not None and value.isascii() and value.isdigit() else None
    if declared is not None and declared > limit:
        raise too_large(limit)
    return declared


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit`."""
    declared_length(request, limit)
    if body_received(request.scope):
        # A small body usually comes with its headers: with nothing left to wait for, no timer
        # (arming and cancelling one costs more than reading the body).
        return await _read(request, limit)
    timeout = app_state(request).settings.http_body_timeout
    try:
        async with asyncio.timeout(timeout):
            return await _read(request, limit)
    except TimeoutError:
        raise ApiError(
            408, f"request body not received within {timeout:g} s", headers=CLOSE
        ) from None


async def _read(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)
