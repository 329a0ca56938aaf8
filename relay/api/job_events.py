"""Hearing of a job without a callback URL: its events as a stream.

GET /api/relay/v1/jobs/{id}/events   server-sent events (`Accept: text/event-stream`): every
                                     event of the job from `Last-Event-ID` on, then each as it
                                     comes; closed after the job's last event

It reads what the job's own scripts recorded (relay.jobs.history) and wait on its
announcements (relay.api.waiters): never an upstream call. An event's SSE `id` is its
`sequence`, so a client that reconnects with `Last-Event-ID` resumes where it left off, with no
gap and nothing twice. A stream that has sent nothing for RELAY_EVENTS_KEEPALIVE sends a
comment, so proxies keep it open; one whose server shuts down ends cleanly (the client
reconnects, with its Last-Event-ID).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from relay.api.models import MAX_ID_LENGTH
from relay.api.scoping import not_found, request_owner
from relay.api.state import AppState, app_state
from relay.api.status import path_segment
from relay.delivery.store import Delivery
from relay.errors import ApiError
from relay.jobs.store import Job

EVENT_STREAM = "text/event-stream"
# What a stream's answer says to clients and proxies: never cache, never buffer.
STREAM_HEADERS = {"cache-control": "no-store", "x-accel-buffering": "no"}
KEEPALIVE = b": keepalive\n\n"
# Events one read of a job's history takes at most.
PAGE = 100
# Delivery states after which nothing more is to come for a job (redeliveries aside).
SETTLED = frozenset({"none", "delivered", "gone", "failed", "stale"})


def _accepts_events(request: Request) -> bool:
    accept = request.headers.get("accept", "*/*")
    kinds = {part.split(";", 1)[0].strip().lower() for part in accept.split(",")}
    return bool(kinds & {EVENT_STREAM, "text/*", "*/*"})


def _last_event_id(request: Request) -> int:
    value = request.headers.get("last-event-id", "").strip()
    if not value:
        return 0
    if not (value.isascii() and value.isdigit() and len(value) <= 18):
        raise ApiError(400, "Last-Event-ID must be the id (sequence number) of an event received")
    return int(value)


def sse(event: dict[str, Any]) -> bytes:
    """One event in the text/event-stream format: its sequence as `id`, its type as `event`."""
    return (
        f"id: {event['sequence']}\nevent: {event.get('type', 'message')}\ndata: ".encode()
        + orjson.dumps(event)
        + b"\n\n"
    )


async def _job(state: AppState, request: Request, id_or_reference: str) -> Job:
    if len(id_or_reference) > MAX_ID_LENGTH:
        raise ApiError(400, f"id is longer than {MAX_ID_LENGTH} characters")
    path_segment(id_or_reference, "id")
    try:
        # Among the jobs the caller may see (relay.api.scoping): another's is the same 404.
        job = await state.store.find_owned(id_or_reference, request_owner(request))
    except RedisError:
        raise ApiError(503, "the relay's job store is unavailable; try again") from None
    if job is None:
        raise not_found()
    return job


def _done(job: Job | None) -> bool:
    """Nothing more is to come for this job: it ended and its delivery is settled (or it is
    gone from the store)."""
    return job is None or (job.ended and (Delivery.of(job).state or "none") in SETTLED)


async def job_events(request: Request) -> Response:
    state = app_state(request)
    if not _accepts_events(request):
        raise ApiError(406, f"this route answers {EVENT_STREAM} only: send Accept: {EVENT_STREAM}")
    job = await _job(state, request, request.path_params["id"])
    after = _last_event_id(request)
    return StreamingResponse(
        _stream(state, job.request_id, after),
        media_type=EVENT_STREAM,
        headers=STREAM_HEADERS,
    )


async def _stream(state: AppState, request_id: str, after: int) -> AsyncIterator[bytes]:
    """The job's events numbered above `after`, then each as it comes, until its last.

    A client that hangs up cancels this generator (Starlette listens for it), which lets go of
    its waiter on the way out.
    """
    waiters = state.waiters
    keepalive = state.settings.events_keepalive
    with waiters.watch("stream", job=request_id) as waiter:
        while True:
            try:
                # The job first, then its history: when the job reads as done, the history
                # read after it holds its last event.
                job = await state.store.get(request_id)
                events = await state.history.after(request_id, after)
            except RedisError:
                return  # the client reconnects with its Last-Event-ID
            for event in events:
                yield sse(event)
                after = event["sequence"]
                if event.get("last"):
                    return
            if len(events) >= PAGE:
                continue
            if _done(job) or waiters.draining:
                return
            if not await waiter.next(keepalive):
                yield KEEPALIVE
