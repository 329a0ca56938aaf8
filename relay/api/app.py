"""The API process's app: Chamelaion's lip-sync routes under /api, plus health and metrics.

Shaped like Chamelaion's own API (paths, auth, `{"error": ...}` bodies), so the official SDK
works against it by changing only its base URL and key. This module only wires: the routes live
in relay.api.submit, relay.api.uploads and relay.api.status.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from relay.api.auth import ApiKeyMiddleware, KeyRing
from relay.api.limits import UploadSlots
from relay.api.openapi import openapi_document
from relay.api.responses import api_error, http_error, unexpected_error
from relay.api.state import AppState, app_state
from relay.api.status import get_request, list_requests
from relay.api.submit import generate
from relay.api.uploads import generate_with_media
from relay.errors import ApiError
from relay.jobs.store import JobStore
from relay.metrics import metrics_response
from relay.redis_conn import close as close_redis
from relay.redis_conn import connect
from relay.settings import Settings
from relay.upstream import Upstream


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    try:
        await app_state(request).redis.ping()
    except RedisError:
        return JSONResponse({"status": "unavailable", "error": "redis unreachable"}, 503)
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    return await metrics_response(app_state(request).redis)


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_document())


def create_app(settings: Settings) -> Starlette:
    settings.require("api")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        redis = connect(settings.redis_url)
        upstream = Upstream.from_settings(settings)
        try:
            yield {
                "relay": AppState(
                    settings,
                    redis,
                    JobStore(redis),
                    upstream,
                    settings.callback_policy(),
                    UploadSlots(settings.max_uploads, settings.max_uploads_per_key),
                )
            }
        finally:
            await upstream.aclose()
            await close_redis(redis)

    routes = [
        Route("/api/v1/lipsync/generate", generate, methods=["POST"]),
        Route("/api/v1/lipsync/generate-with-media", generate_with_media, methods=["POST"]),
        Route("/api/v1/lipsync/requests/{id}", get_request, methods=["GET"]),
        Route("/api/v1/lipsync/requests", list_requests, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[
            Middleware(
                ApiKeyMiddleware,
                keys=KeyRing(settings.api_keys),
                metrics_auth=settings.metrics_auth,
            )
        ],
        exception_handlers={
            ApiError: api_error,
            HTTPException: http_error,
            Exception: unexpected_error,
        },
    )
