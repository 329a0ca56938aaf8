"""The worker's own small HTTP port: a liveness check that fails when the worker is stuck."""

from __future__ import annotations

from collections.abc import Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def create_worker_http_app(healthy: Callable[[], bool]) -> Starlette:
    async def healthz(request: Request) -> Response:
        if healthy():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "stuck", "error": "the poll loop has stopped"}, 503)

    return Starlette(routes=[Route("/healthz", healthz, methods=["GET"])])
