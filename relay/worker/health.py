"""The worker's own small HTTP port: liveness that fails when the worker is stuck, readiness that
fails while Redis is unreachable or has lost the relay's data (no restart fixes either), and
metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from relay.api.auth import ApiKeyMiddleware
from relay.callers.source import CallerSource
from relay.lifecycle import Service
from relay.redis.shared_state import metrics_response
from relay.redis.watch import RedisWatch, readiness
from relay.serving import embedded_server


def create_worker_http_app(
    healthy: Callable[[], bool],
    redis: Redis,
    watch: RedisWatch,
    *,
    metrics_callers: CallerSource | None = None,
) -> Starlette:
    """`metrics_callers` (RELAY_METRICS_AUTH): /metrics answers only with a caller's key."""

    async def healthz(request: Request) -> Response:
        if healthy():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "stuck", "error": "the worker has stopped working"}, 503)

    async def readyz(request: Request) -> Response:
        return await readiness(watch)

    async def metrics(request: Request) -> Response:
        return await metrics_response(redis)

    middleware = []
    if metrics_callers is not None:
        middleware.append(Middleware(ApiKeyMiddleware, callers=metrics_callers, metrics_auth=True))
    return Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        middleware=middleware,
    )


class HealthPort(Service):
    """The port as a worker service: it answers until the worker's last step of stopping."""

    name = "worker-http"

    def __init__(self, app: Starlette, port: int) -> None:
        # All interfaces: the kubelet's probes and Prometheus reach the pod from outside.
        self.server = embedded_server(app, host="0.0.0.0", port=port)  # noqa: S104

    async def run(self, stop: asyncio.Event) -> None:
        serving = asyncio.create_task(self.server.serve(), name="worker-http-serve")
        try:
            await stop.wait()
        finally:
            self.server.should_exit = True
            await serving
