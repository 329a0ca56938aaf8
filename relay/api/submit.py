"""Submitting a job: validate, check the callback URL, forward to Chamelaion, track it.

A submitted job is recorded in Redis before the caller hears "success": a job the caller knows
of is always a job the relay tracks. Both submit routes (JSON here, uploads in relay.api.uploads)
end in `accept_job`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import httpx
import orjson
from pydantic import ValidationError
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from relay.api.body import read_body
from relay.api.models import MAX_ID_LENGTH, GenerateRequest, parsed_callback_url
from relay.api.responses import json_bytes
from relay.api.state import AppState, app_state
from relay.delivery.netpolicy import resolve_and_check
from relay.errors import ApiError
from relay.metrics import JOBS_SUBMITTED
from relay.upstream import check, decode_object

log = logging.getLogger(__name__)


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
    return await accept_job(
        state,
        response,
        job.callback_url,
        job.reference_id,
        events=job.callback_events,
        metadata=orjson.dumps(job.callback_metadata) if job.callback_metadata else None,
    )


async def accept_job(
    state: AppState,
    response: httpx.Response,
    callback_url: str | None,
    reference_id: str | None,
    *,
    events: Sequence[str] | None = None,
    metadata: bytes | None = None,
) -> Response:
    """Chamelaion's answer to a submission: its error mapped, or the job tracked and passed on."""
    answer = decode_object(check(response))
    request_id = answer.get("request_id")
    if not isinstance(request_id, str) or not request_id or len(request_id) > MAX_ID_LENGTH:
        raise ApiError(502, "Chamelaion accepted the job but sent no usable request_id")
    await track_job(state, request_id, callback_url, reference_id, events=events, metadata=metadata)
    return json_bytes(response.content)


async def check_callback_url(state: AppState, callback_url: str | None) -> None:
    """Refuse (422) a callback URL whose host is, or resolves into, a refused network.

    This is early feedback for the caller; delivery checks again at connect time, since DNS
    answers can change in between.
    """
    if callback_url is not None:
        # An IP literal is checked without resolving; a name is resolved every time.
        await resolve_and_check(parsed_callback_url(callback_url), state.policy)


async def ensure_store(state: AppState) -> None:
    # Refuse before Chamelaion creates a job the relay could not then record.
    try:
        await state.write_check.ensure_writable()
    except RedisError:
        raise ApiError(503, "the relay's job store is unavailable; try again") from None


async def track_job(
    state: AppState,
    request_id: str,
    callback_url: str | None,
    reference_id: str | None,
    *,
    events: Sequence[str] | None = None,
    metadata: bytes | None = None,
) -> None:
    try:
        created = await state.store.create(
            request_id,
            callback_url=callback_url,
            reference_id=reference_id,
            first_poll_in=state.settings.poll_min_interval,
            events=events,
            metadata=metadata,
        )
    except RedisError:
        log.error("Chamelaion accepted %s but it could not be recorded", request_id)
        raise ApiError(503, "the relay's job store is unavailable; try again") from None
    if created:
        JOBS_SUBMITTED.inc()
        log.info("job submitted", extra={"request_id": request_id})
