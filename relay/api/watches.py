"""POST /api/relay/v1/watches: call back for a job that was submitted to Chamelaion directly.

The job is named by its request id or its `reference_id`; Chamelaion is asked for it first
(404 when it does not know it), then the relay tracks it like one of its own: polled, called
back when it ends (at once, if it already has), with the same `callback_events` filter and
`callback_metadata` a submission takes. Watching is idempotent: the same job with the
same callback answers 200 again; with a different callback it is 409 (one callback per job).
"""

from __future__ import annotations

import logging
from typing import Any, Self
from urllib.parse import quote

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from relay.api.auth import request_caller
from relay.api.body import read_body
from relay.api.models import (
    MAX_ID_LENGTH,
    CallbackEvents,
    CallbackMetadata,
    CallbackUrl,
    ReferenceId,
)
from relay.api.state import app_state
from relay.api.submit import check_callback_url, ensure_store, validation_error
from relay.errors import ApiError, UpstreamError
from relay.upstream import check, decode_object

log = logging.getLogger(__name__)

PATH = "/api/relay/v1/watches"


class WatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    request_id: ReferenceId | None = None
    reference_id: ReferenceId | None = None
    callback_url: CallbackUrl
    callback_events: CallbackEvents | None = None
    callback_metadata: CallbackMetadata | None = None

    @model_validator(mode="after")
    def _exactly_one_name(self) -> Self:
        if (self.request_id is None) == (self.reference_id is None):
            raise ValueError("give exactly one of request_id and reference_id")
        return self


async def watch(request: Request) -> Response:
    state = app_state(request)
    raw = await read_body(request, state.settings.max_body_bytes)
    try:
        wanted = WatchRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_error(exc) from None
    await check_callback_url(state, wanted.callback_url)
    await ensure_store(state)
    name = wanted.request_id or wanted.reference_id
    assert name is not None
    try:
        response = check(
            await state.upstream.request("GET", f"v1/lipsync/requests/{quote(name, safe='')}")
        )
    except UpstreamError as exc:
        if exc.status_code == 404:
            raise ApiError(404, "Chamelaion does not know this request") from None
        raise
    found: dict[str, Any] = decode_object(response)
    request_id = found.get("id")
    if not isinstance(request_id, str) or not request_id or len(request_id) > MAX_ID_LENGTH:
        raise ApiError(502, "Chamelaion answered without a usable request id")
    reference_id = found.get("reference_id")
    created = await state.store.create(
        request_id,
        callback_url=wanted.callback_url,
        reference_id=reference_id if isinstance(reference_id, str) and reference_id else None,
        first_poll_in=0,
        events=wanted.callback_events,
        metadata=orjson.dumps(wanted.callback_metadata) if wanted.callback_metadata else None,
        caller=request_caller(request).name,
    )
    if not created:
        tracked = await state.store.get(request_id)
        if tracked is None or tracked.callback_url != wanted.callback_url:
            raise ApiError(409, "this request is already tracked with a different callback_url")
    else:
        log.info("watching a job submitted elsewhere", extra={"request_id": request_id})
    return JSONResponse(
        {"request_id": request_id, "watching": True, "created": created},
        status_code=201 if created else 200,
    )
