"""The sandbox upstream: a faithful in-memory stand-in for Chamelaion's lip-sync API.

The relay's tests and `relay dev` talk to it over real HTTP at `http://host:port/api`, exactly
as they would to https://api.chamelaion.com/api: the same paths, auth rules, JSON shapes and
error bodies. Jobs move queued -> processing -> completed|failed with time; a job fails when
its video URL (or upload's filename) or reference_id contains "fail". Test-control endpoints
under /_sandbox (see `sandbox_control`) inject faults and show what the relay sent.

Every call to /api passes the same gate, in this order: half the configured network latency,
it is counted for /_sandbox/stats, then any injected fault applies (a delay, a change to the
list, an error), then auth, then the rate limit, then the endpoint itself (its answer spoilt if
the fault says so), then the other half of the latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from relay.sandbox.api import SandboxApi, drain
from relay.sandbox.control import SandboxControl
from relay.sandbox.errors import SandboxError
from relay.sandbox.malformed import malform
from relay.sandbox.state import Fault, SandboxConfig, SandboxState, retry_after_header

__all__ = ["SandboxConfig", "create_sandbox_app"]

Endpoint = Callable[[Request], Awaitable[Response]]

_FAULT_MESSAGES = {
    401: "unauthorized",
    404: "lipsync request not found",
    429: "rate limit exceeded",
    500: "internal error",
}


@dataclass(frozen=True)
class _Spec:
    method: str
    path: str
    group: str  # what a fault's "paths" can name: "poll", "generate" or "other"
    authenticated: bool
    handler: Endpoint

    @property
    def key(self) -> str:
        return f"{self.method} {self.path}"


def auth_problem(headers: Headers, api_keys: tuple[str, ...]) -> str | None:
    """Chamelaion's 401 message for these headers, or None when they carry a known key."""
    api_key = headers.get("x-api-key", "")
    if api_key:
        return None if _known(api_key, api_keys) else "unauthorized"
    authorization = headers.get("authorization", "")
    if not authorization:
        return "missing authorization header"
    # HTTP servers strip trailing whitespace, so "Bearer " arrives as "Bearer": no token.
    scheme, _, token = authorization.partition(" ")
    if scheme != "Bearer":
        return "invalid authorization format"
    token = token.strip()
    if not token:
        return "missing token"
    return None if _known(token, api_keys) else "invalid token"


def _known(candidate: str, api_keys: tuple[str, ...]) -> bool:
    # Compare against every key, not stopping at a match, so timing says nothing of which.
    matches = [hmac.compare_digest(candidate.encode(), key.encode()) for key in api_keys]
    return any(matches)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _fault_response(fault: Fault, status: int) -> Response:
    message = fault.error or _FAULT_MESSAGES.get(status) or HTTPStatus(status).phrase.lower()
    headers = {}
    if fault.retry_after is not None:
        headers["Retry-After"] = retry_after_header(fault.retry_after)
    return _error(status, message, headers)


async def _refuse(request: Request, response: Response) -> Response:
    await drain(request)
    return response


def _gated(spec: _Spec, state: SandboxState) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        state.enter(spec.key)
        transit = state.config.latency / 2
        try:
            if transit:
                await asyncio.sleep(transit)
            response = await gated(request)
            if transit:
                await asyncio.sleep(transit)
            return response
        finally:
            state.leave(spec.key)

    async def gated(request: Request) -> Response:
        state.record_call(spec.key)
        fault = state.take_fault(spec.key, spec.group)
        if fault is not None and fault.delay:
            await asyncio.sleep(fault.delay)
        if fault is not None:
            state.grow(fault.grow)
            state.vanish(fault.vanish)
        if fault is not None and fault.status is not None and not fault.after_handling:
            return await _refuse(request, _fault_response(fault, fault.status))
        if spec.authenticated:
            problem = auth_problem(request.headers, state.config.api_keys)
            if problem is not None:
                return await _refuse(request, _error(401, problem))
            wait = state.rate_limit_wait()
            if wait is not None:
                headers = {"Retry-After": retry_after_header(wait)}
                return await _refuse(request, _error(429, "rate limit exceeded", headers))
        if fault is not None and fault.malformed is not None:
            return malform(fault.malformed, await spec.handler(request))
        if fault is None or fault.status is None:
            return await spec.handler(request)
        # An "after" fault: the work is done (a job may exist) but the answer is lost.
        with contextlib.suppress(SandboxError):
            await spec.handler(request)
        return _fault_response(fault, fault.status)

    return endpoint


async def _sandbox_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SandboxError)
    return _error(exc.status_code, exc.message)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, exc.detail.lower(), dict(exc.headers or {}))


async def _internal_error(request: Request, exc: Exception) -> Response:
    return _error(500, "internal error")


def create_sandbox_app(config: SandboxConfig = SandboxConfig()) -> Starlette:  # noqa: B008 - frozen
    state = SandboxState(config)
    api = SandboxApi(state)
    specs = [
        _Spec("GET", "/health", "other", False, api.health),
        _Spec("GET", "/v1/users/me", "other", True, api.me),
        _Spec("POST", "/v1/lipsync/generate", "generate", True, api.generate),
        _Spec("POST", "/v1/lipsync/generate-with-media", "generate", True, api.generate_with_media),
        _Spec("GET", "/v1/lipsync/requests", "poll", True, api.list_requests),
        _Spec("GET", "/v1/lipsync/requests/{id}", "poll", True, api.get_request),
    ]
    control = SandboxControl(state, [spec.key for spec in specs])
    control_routes = [
        Route("/faults", control.add_fault, methods=["POST"]),
        Route("/faults", control.clear_faults, methods=["DELETE"]),
        Route("/requests", control.create_jobs, methods=["POST"]),
        Route("/requests/{id}/forget", control.forget, methods=["POST"]),
        Route("/requests/{id}/status", control.set_status, methods=["POST"]),
        Route("/requests/{id}/uploads", control.uploads, methods=["GET"]),
        Route("/requests/{id}/body", control.body, methods=["GET"]),
        Route("/finish", control.finish, methods=["POST"]),
        Route("/finishes", control.finishes, methods=["GET"]),
        Route("/stats", control.stats, methods=["GET"]),
        Route("/reset", control.reset, methods=["POST"]),
    ]
    api_routes = [Route(s.path, _gated(s, state), methods=[s.method]) for s in specs]
    return Starlette(
        routes=[Mount("/api", routes=api_routes), Mount("/_sandbox", routes=control_routes)],
        exception_handlers={
            SandboxError: _sandbox_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
    )
