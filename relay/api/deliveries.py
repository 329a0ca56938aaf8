"""Seeing and steering deliveries: a job's attempt log, deliveries by state, redeliver, recover.

GET  /api/relay/v1/jobs/{id}/deliveries   every event of a job with its attempts
GET  /api/relay/v1/deliveries             deliveries in a state, newest first, paginated
POST /api/relay/v1/jobs/{id}/redeliver    the job's final event again now (same webhook-id)
POST /api/relay/v1/deliveries/recover     every delivery that failed since a time, capped
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from relay.api.auth import request_caller
from relay.api.body import read_body
from relay.api.models import MAX_ID_LENGTH
from relay.api.scoping import list_owner, owned_job
from relay.api.state import AppState, app_state
from relay.api.steering_limits import RECOVER, REDELIVER, SteeringLimits, allowance
from relay.api.submit import validation_error
from relay.callers.model import NAME_PATTERN
from relay.delivery.attempt_log import STATES
from relay.delivery.store import Delivery, DeliveryId
from relay.errors import ApiError
from relay.jobs.events import event_type_of
from relay.jobs.events import iso as event_iso
from relay.jobs.store import Job

PREFIX = "/api/relay/v1"
MAX_PAGE = 200
MAX_RECOVER = 1000
# A caller's deliveries are picked out of every caller's: read in batches, up to a bound.
SCAN_BATCH = 500
MAX_SCAN = 5000

State = Literal["pending", "failing", "delivered", "gone", "failed"]


def iso(seconds: float | None) -> str | None:
    return None if seconds is None else event_iso(seconds)


# Times the relay can show back: from the epoch to the end of year 9999.
LATEST = 253402300799.0


def parse_time(value: str | float, name: str) -> float:
    """An ISO 8601 time (with a zone, or UTC) or seconds since the epoch."""
    problem = f"{name} must be an ISO 8601 time or seconds since the epoch (1970 to 9999)"
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)
        except ValueError:
            try:
                parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                raise ApiError(400, problem) from None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            value = parsed.timestamp()
    if not 0 <= value <= LATEST:  # also refuses NaN
        raise ApiError(400, problem)
    return float(value)


def request_id_param(request: Request) -> str:
    request_id: str = request.path_params["id"]
    if not 1 <= len(request_id) <= MAX_ID_LENGTH or request_id in (".", ".."):
        raise ApiError(400, f"id must be 1 to {MAX_ID_LENGTH} characters, not a dot segment")
    if DeliveryId.names_early(request_id):
        raise ApiError(400, "id must be a request id")
    return request_id


async def _delivery(state: AppState, delivery_id: str, job: Job) -> dict[str, Any]:
    attempts = await state.attempt_log.entries(delivery_id)
    for entry in attempts:
        entry["at"] = iso(entry.get("at"))
        if entry.get("next_at") is not None:
            entry["next_at"] = iso(entry["next_at"])
    seen = Delivery.of(job)
    return {
        "delivery_id": delivery_id,
        "event": event_type_of(job.event),
        "webhook_id": job.event_id,
        "state": seen.state,
        "attempts_made": seen.attempts_made,
        "last_result": seen.last_result,
        "attempts": attempts,
    }


async def deliveries_of(state: AppState, job: Job) -> list[dict[str, Any]]:
    """A job's deliveries in the order they go out (early events first), with their logs."""
    deliveries = []
    processing = await state.store.get(str(DeliveryId(job.request_id, "processing")))
    if processing is not None and processing.event is not None:
        deliveries.append(await _delivery(state, processing.request_id, processing))
    if job.event is not None:
        deliveries.append(await _delivery(state, job.request_id, job))
    return deliveries


async def tracked_job(state: AppState, request: Request) -> Job:
    """The job the path's id (a request id or a reference_id) names among those the caller may
    see; 404 when untracked or another caller's (relay.api.scoping)."""
    return await owned_job(state, request, request_id_param(request))


async def job_deliveries(request: Request) -> Response:
    state = app_state(request)
    job = await tracked_job(state, request)
    deliveries = await deliveries_of(state, job)
    return JSONResponse(
        {
            "request_id": job.request_id,
            "callback": job.callback_url is not None,
            "status": job.status,
            "deliveries": deliveries,
            # Who steered it (relay.jobs.audit), newest first.
            "audit": [
                {**entry, "at": iso(entry.get("at"))}
                for entry in await state.audit.entries(job.request_id)
            ],
        }
    )


def _query_int(request: Request, name: str, default: int, high: int) -> int:
    value = request.query_params.get(name)
    if value is None:
        return default
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= high:
        raise ApiError(400, f"{name} must be an integer from 1 to {high}")
    return int(value)


async def list_deliveries(request: Request) -> Response:
    state = app_state(request)
    wanted = request.query_params.get("state", "failing")
    if wanted not in STATES:
        raise ApiError(400, f"state must be one of {', '.join(STATES)}")
    limit = _query_int(request, "limit", 50, MAX_PAGE)
    since = parse_time(request.query_params.get("since", "0"), "since")
    cursor = request.query_params.get("cursor")
    until = parse_time(cursor, "cursor") if cursor else float("inf")
    owner = list_owner(request)
    if owner is None:
        found = await state.attempt_log.page(wanted, since=since, until=until, limit=limit + 1)
        page = found[:limit]
        next_cursor = repr(page[-1][1]) if len(found) > limit else None
    else:
        page, next_at = await _owned_page(state, owner, wanted, since, until, limit)
        next_cursor = None if next_at is None else repr(next_at)
    data = []
    for delivery_id, entered in page:
        delivery = DeliveryId.parse(delivery_id)
        data.append(
            {
                "delivery_id": delivery_id,
                "request_id": delivery.request_id,
                "event": "lipsync.processing" if delivery.early == "processing" else "final",
                "state": wanted,
                "since": iso(entered),
            }
        )
    return JSONResponse({"data": data, "next_cursor": next_cursor})


async def _owned_page(
    state: AppState, owner: str, wanted: str, since: float, until: float, limit: int
) -> tuple[list[tuple[str, float]], float | None]:
    """A page of `owner`'s deliveries in a state, and the cursor past it (None: no more).

    The state indexes hold every caller's deliveries: they are read newest first in batches and
    kept when the job is the owner's. At most MAX_SCAN entries are read per request, so a
    caller among many busy ones may get a short page with a cursor to go on from.
    """
    kept: list[tuple[str, float]] = []
    scanned = 0
    cursor = until
    while scanned < MAX_SCAN:
        batch = await state.attempt_log.page(wanted, since=since, until=cursor, limit=SCAN_BATCH)
        owners = await state.store.callers_of(
            [DeliveryId.parse(delivery_id).request_id for delivery_id, _ in batch]
        )
        for (delivery_id, entered), job_owner in zip(batch, owners, strict=True):
            if job_owner == owner:
                if len(kept) == limit:
                    return kept, kept[-1][1]
                kept.append((delivery_id, entered))
        scanned += len(batch)
        if len(batch) < SCAN_BATCH:
            return kept, None
        cursor = batch[-1][1]
    return kept, cursor


def _caller(request: Request) -> str:
    """The request's caller's name, for per-caller limits."""
    return request_caller(request).name


async def redeliver(request: Request) -> Response:
    state = app_state(request)
    await SteeringLimits(state.redis).count(allowance(state.settings, REDELIVER), _caller(request))
    job = await tracked_job(state, request)
    done = await state.redeliverer.redeliver(
        job.request_id, note="redelivery requested", by=request_caller(request).name
    )
    if done.refused == "not_ended":
        raise ApiError(409, "the job has not ended yet: its callback goes out when it does")
    if done.refused == "no_callback":
        raise ApiError(409, "the job has no callback_url")
    if done.refused is not None:
        raise ApiError(404, "no tracked job has this id or reference_id")
    return JSONResponse(
        {
            "request_id": job.request_id,
            "webhook_id": job.event_id,
            "attempt": done.attempt,
            "requeued": True,
        },
        status_code=202,
    )


class RecoverRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    since: str | float | int
    states: Annotated[list[Literal["failing", "failed", "gone"]], Field(min_length=1)] = [
        "failing",
        "failed",
    ]
    limit: Annotated[int, Field(ge=1, le=MAX_RECOVER)] = 100
    # An admin's caller filter: only that caller's deliveries (a caller's own are always its).
    caller: Annotated[str, StringConstraints(pattern=NAME_PATTERN)] | None = None

    @field_validator("since")
    @classmethod
    def _time(cls, value: str | float | int) -> str | float | int:
        try:
            parse_time(value, "since")
        except ApiError as exc:
            raise ValueError(exc.message) from None
        return value


async def recover(request: Request) -> Response:
    state = app_state(request)
    await SteeringLimits(state.redis).count(allowance(state.settings, RECOVER), _caller(request))
    raw = await read_body(request, state.settings.max_body_bytes)
    try:
        wanted = RecoverRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_error(exc) from None
    since = parse_time(wanted.since, "since")
    if "gone" in wanted.states and not request_caller(request).admin:
        # A receiver that answered 410 asked for no more: only an admin may overrule it.
        raise ApiError(403, 'states "gone" is for admin callers only')
    done = await state.redeliverer.recover(
        states=tuple(dict.fromkeys(wanted.states)),
        since=since,
        limit=wanted.limit,
        owner=list_owner(request, wanted.caller),
        by=request_caller(request).name,
    )
    return JSONResponse(
        {
            "requeued": done.requeued,
            "already_pending": done.already_pending,
            "more": done.more,
            "since": iso(since),
        }
    )
