"""The HTTP API: Chamelaion's lip-sync routes under /api, plus callbacks and health.

Shaped like Chamelaion's own API (paths, auth, `{"error": ...}` bodies), so the official SDK
works against it by changing only its base URL and key. A submitted job is recorded in Redis
before the caller hears "success": a job the caller knows of is always a job the relay tracks.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import orjson
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from relay.auth import ApiKeyMiddleware, KeyRing
from relay.errors import ApiError
from relay.metrics import JOBS_SUBMITTED, metrics_response
from relay.models import MAX_ID_LENGTH, GenerateRequest
from relay.netpolicy import NetworkPolicy, parse_callback_url, resolve_and_check
from relay.openapi import openapi_document
from relay.redis_conn import close as close_redis
from relay.redis_conn import connect
from relay.settings import Settings
from relay.store import JobStore
from relay.uploads import generate_with_media
from relay.upstream import Upstream, check, decode_object

log = logging.getLogger("relay.api")

LIST_PARAMS = {"limit": (1, 1000), "offset": (0, 10**9)}


@dataclass
class AppState:
    settings: Settings
    redis: Redis
    store: JobStore
    upstream: Upstream
    policy: NetworkPolicy


def app_state(request: Request) -> AppState:
    state: AppState = request.state.relay
    return state


def json_bytes(body: bytes) -> Response:
    """A 200 with JSON the relay already holds as bytes (no re-encoding)."""
    return Response(body, media_type="application/json")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def validation_error(exc: ValidationError) -> ApiError:
    details = [
        {"field": ".".join(str(part) for part in error["loc"]) or "body", "message": error["msg"]}
        for error in exc.errors(include_url=False, include_input=False)
    ]
    first = details[0]
    return ApiError(422, f"invalid request: {first['field']}: {first['message']}", details=details)


async def generate(request: Request) -> Response:
    state = app_state(request)
    raw = await read_body(request, state.settings.max_body_bytes)
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        job = GenerateRequest.model_validate(parsed)
    except ValidationError as exc:
        raise validation_error(exc) from None
    await check_callback_url(state, job.callback_url)
    await ensure_store(state)
    response = await state.upstream.request("POST", "v1/lipsync/generate", json=job.upstream_body())
    return await accept_job(state, response, job.callback_url, job.reference_id)


async def accept_job(
    state: AppState,
    response: httpx.Response,
    callback_url: str | None,
    reference_id: str | None,
) -> Response:
    """Chamelaion's answer to a submission: its error mapped, or the job tracked and passed on."""
    answer = decode_object(check(response))
    request_id = answer.get("request_id")
    if not isinstance(request_id, str) or not request_id or len(request_id) > MAX_ID_LENGTH:
        raise ApiError(502, "Chamelaion accepted the job but sent no usable request_id")
    await track_job(state, request_id, callback_url, reference_id)
    return json_bytes(response.content)


async def check_callback_url(state: AppState, callback_url: str | None) -> None:
    """Refuse (422) a callback URL whose host is, or resolves into, a refused network.

    This is early feedback for the caller; delivery checks again at connect time, since DNS
    answers can change in between.
    """
    if callback_url is not None:
        await resolve_and_check(parse_callback_url(callback_url), state.policy)


async def ensure_store(state: AppState) -> None:
    # Refuse before Chamelaion creates a job the relay could not then record.
    try:
        await state.redis.ping()
    except RedisError:
        raise ApiError(503, "the relay's job store is unavailable; try again") from None


async def track_job(
    state: AppState, request_id: str, callback_url: str | None, reference_id: str | None
) -> None:
    try:
        created = await state.store.create(
            request_id,
            callback_url=callback_url,
            reference_id=reference_id,
            first_poll_in=state.settings.poll_min_interval,
        )
    except RedisError:
        log.error("Chamelaion accepted %s but it could not be recorded", request_id)
        raise ApiError(503, "the relay's job store is unavailable; try again") from None
    if created:
        JOBS_SUBMITTED.inc()
        log.info("job submitted", extra={"request_id": request_id})


async def get_request(request: Request) -> Response:
    state = app_state(request)
    id_or_reference: str = request.path_params["id"]
    if len(id_or_reference) > MAX_ID_LENGTH:
        raise ApiError(400, f"id is longer than {MAX_ID_LENGTH} characters")
    try:
        job = await state.store.find(id_or_reference)
    except RedisError:
        log.warning("job store unavailable: answering from Chamelaion")
        job = None
    if job is not None and job.body is not None:
        return json_bytes(job.body)
    response = check(
        await state.upstream.request(
            "GET", f"v1/lipsync/requests/{quote(id_or_reference, safe='')}"
        )
    )
    decode_object(response)
    return json_bytes(response.content)


async def list_requests(request: Request) -> Response:
    state = app_state(request)
    params: dict[str, str] = {}
    for name, (low, high) in LIST_PARAMS.items():
        value = request.query_params.get(name)
        if value is None:
            continue
        if not (value.isascii() and value.isdigit()) or not low <= int(value) <= high:
            raise ApiError(400, f"{name} must be an integer from {low} to {high}")
        params[name] = str(int(value))
    reference_id = request.query_params.get("reference_id")
    if reference_id is not None:
        if not 1 <= len(reference_id) <= 256:
            raise ApiError(400, "reference_id must be 1 to 256 characters")
        params["reference_id"] = reference_id
    response = check(await state.upstream.request("GET", "v1/lipsync/requests", params=params))
    decode_object(response)
    return json_bytes(response.content)


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


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    content: dict[str, Any] = {"error": exc.message}
    if exc.details:
        content["details"] = exc.details
    return JSONResponse(content, exc.status_code, headers=exc.headers)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)


async def unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": "internal error"}, 500)


def create_app(settings: Settings) -> Starlette:
    settings.require("api")
    assert settings.chamelaion_api_key is not None
    api_key = settings.chamelaion_api_key.get_secret_value()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        redis = connect(settings.redis_url)
        upstream = Upstream(
            settings.chamelaion_base_url, api_key, timeout=settings.upstream_timeout
        )
        try:
            yield {
                "relay": AppState(
                    settings, redis, JobStore(redis), upstream, settings.callback_policy()
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
        middleware=[Middleware(ApiKeyMiddleware, keys=KeyRing(settings.api_keys))],
        exception_handlers={
            ApiError: api_error,
            HTTPException: http_error,
            Exception: unexpected_error,
        },
    )
