"""POST /api/relay/v1/watches: call back for a job that was submitted to Chamelaion directly.

The job is named by its request id or its `reference_id`; Chamelaion is asked for it first
(404 when it does not know it), then the relay tracks it like one of its own: polled, called
back when it ends (at once, if it already has), with the same `callback_events` filter and
`callback_metadata` a submission takes. Watching is idempotent: the same job with the
same callback answers 200 again; with a different callback it is 409 (one callback per job).

A job is watched by a caller that may see it (#24): an admin watches any job, for itself or
for a named caller (`caller`), who then sees and steers it; any other caller only re-watches
its own tracked jobs, and another caller's job or one submitted elsewhere is a 404 like a job
that does not exist. Nobody watches a job whose reference_id an open submission intent holds
(relay.jobs.intents): the job may be that submission's, and its submitter's callback would be
lost. Names get the same path-segment checks as every route (no `.` or `..`).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Self

import orjson
from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError, model_validator
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
from relay.api.scoping import not_found
from relay.api.state import AppState, app_state
from relay.api.status import path_segment
from relay.api.submit import check_callback_url, ensure_store, validation_error
from relay.callers.model import NAME_PATTERN, Caller
from relay.errors import ApiError, UpstreamError
from relay.jobs.store import Job
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
    # An admin's: the caller the job is watched for (it then sees and steers it).
    caller: Annotated[str, StringConstraints(pattern=NAME_PATTERN)] | None = None

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
    field = "request_id" if wanted.request_id is not None else "reference_id"
    name = wanted.request_id or wanted.reference_id
    assert name is not None
    segment = path_segment(name, field)  # 400 before anything is asked
    caller = request_caller(request)
    owner = _owner(state, caller, wanted.caller)
    # The callback goes out as the owner's: its callback_hosts apply.
    await check_callback_url(state, wanted.callback_url, owner)
    if not caller.admin:
        # A caller may watch only a job it may see: one of its own, already tracked.
        job = await state.store.find_owned(name, caller.name)
        if job is None:
            raise not_found()
        return _again(job, wanted.callback_url)
    await ensure_store(state)
    try:
        response = check(await state.upstream.request("GET", f"v1/lipsync/requests/{segment}"))
    except UpstreamError as exc:
        if exc.status_code == 404:
            raise ApiError(404, "Chamelaion does not know this request") from None
        raise
    found: dict[str, Any] = decode_object(response)
    request_id = found.get("id")
    if not isinstance(request_id, str) or not request_id or len(request_id) > MAX_ID_LENGTH:
        raise ApiError(502, "Chamelaion answered without a usable request id")
    reference_id = found.get("reference_id")
    reference_id = reference_id if isinstance(reference_id, str) and reference_id else None
    if reference_id is not None and await state.intents.open_for(reference_id):
        # Its job may be this one: it is that submission's to track, with that callback.
        raise ApiError(
            409,
            "a submission with this job's reference_id is being settled; its job may be this "
            f"one, so it cannot be watched until then (at most {state.settings.intent_window:g} s)",
        )
    created = await state.store.create(
        request_id,
        callback_url=wanted.callback_url,
        reference_id=reference_id,
        first_poll_in=0,
        events=wanted.callback_events,
        metadata=orjson.dumps(wanted.callback_metadata) if wanted.callback_metadata else None,
        caller=owner.name,
    )
    if not created:
        tracked = await state.store.get(request_id)
        if tracked is None:
            raise ApiError(409, "this request is already tracked with a different callback_url")
        return _again(tracked, wanted.callback_url)
    await state.audit.record(
        request_id,
        caller=caller.name,
        action="watch",
        detail=None if owner is caller else f"for {owner.name}",
    )
    return JSONResponse(
        {"request_id": request_id, "watching": True, "created": True}, status_code=201
    )


def _owner(state: AppState, caller: Caller, named: str | None) -> Caller:
    """Whose job a watch makes it: the caller's own, or (an admin's choice) a named caller's."""
    if named is None or named == caller.name:
        return caller
    if not caller.admin:
        raise ApiError(403, "only an admin caller may watch a job for another caller")
    owner = state.callers.book.named(named)
    if owner is None:
        raise ApiError(422, "invalid request: caller: no caller has this name")
    return owner


def _again(job: Job, callback_url: str) -> Response:
    """A watch of a job tracked already: the same callback is the same watch (200)."""
    if job.callback_url != callback_url:
        raise ApiError(409, "this request is already tracked with a different callback_url")
    return JSONResponse({"request_id": job.request_id, "watching": True, "created": False})
