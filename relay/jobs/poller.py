"""One poll of one job: ask Chamelaion, then either reschedule the job or end it.

The interval adapts per job: it starts at the minimum, grows by half after every poll that saw
no change (and after upstream trouble), and drops back to the minimum when the status moves.
Anything Chamelaion sends that is not a clean final status keeps the job alive: unknown
statuses, odd fields or timestamps (never parsed), bad JSON and 5xx only lengthen the interval.
Only a 404 that lasts longer than the grace period gives a job up, as `lipsync.failed`.

A job past RELAY_MAX_JOB_AGE is asked once more, not given up unasked: a final status it hears
is reported as it is (a job Chamelaion completed is never reported failed), an unfinished one
ends as failed. While Chamelaion gives no usable answer it is asked again, for up to the grace
period more; after that the job ends as failed with a message that says its status is unknown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

import httpx
import orjson
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind

from relay.errors import UpstreamError
from relay.jitter import jittered
from relay.jobs.events import PROCESSING, build_event, event_type, webhook_id
from relay.jobs.schedule import PollSchedule
from relay.jobs.store import Job, JobStore, PollRecord
from relay.metrics import JOBS_ENDED, POLLS, caller_label
from relay.settings import Settings
from relay.tracing import setup, spans
from relay.upstream import Upstream, json_object, parse_retry_after

if TYPE_CHECKING:  # the SDK is imported only once tracing starts
    from relay.tracing.tracer import Tracer

log = logging.getLogger(__name__)

# A LipsyncRequest is a few hundred bytes; refusing huge bodies keeps Redis memory per job bounded.
MAX_BODY_BYTES = 64 * 1024
BACKOFF = 1.5

POLL_RESULTS = {200: "answered", 404: "not_found", 429: "rate_limited"}

# (delivery id, callback URL): hand a delivery over to the delivery stage (relay.delivery),
# which makes its first attempt. Wired in by the worker: jobs sit below the delivery stage.
HandOver = Callable[[str, str], Awaitable[None]]
# Whether an ended job's delivery still waits on its attempts: the delivery stage reads its own
# fields (relay.delivery.store.Delivery) from the job as read. Wired in by the worker too.
DeliveryPending = Callable[[Job], bool]


class Emit(Protocol):
    """Create the delivery of an early event while its job runs; its id, or None when it
    exists already or the job has ended (relay.delivery.store.DeliveryStore.emit)."""

    async def __call__(
        self, job: Job, *, kind: str, event_id: str, event: bytes, retention: float
    ) -> str | None: ...


class Poller:
    def __init__(
        self,
        *,
        store: JobStore,
        schedule: PollSchedule,
        upstream: Upstream,
        settings: Settings,
        hand_over: HandOver,
        emit: Emit,
        delivery_pending: DeliveryPending,
    ) -> None:
        self.store = store
        self.schedule = schedule
        self.upstream = upstream
        self.settings = settings
        self.hand_over = hand_over
        self.emit = emit
        self.delivery_pending = delivery_pending

    def _longer(self, interval: float) -> float:
        low, high = self.settings.poll_min_interval, self.settings.poll_max_interval
        return min(high, max(low, interval * BACKOFF))

    async def poll(self, request_id: str) -> None:
        job = await self.store.get(request_id)
        if job is None:
            # Expired or removed: nothing left to poll for.
            await self.schedule.unschedule(request_id)
            return
        if await self.wrap_up(job):
            return
        started = time.time_ns()
        try:
            # One deadline for the whole call (the client's timeouts are per operation), which
            # the poll's lease is sized to hold (Settings.claim_lease): an answer that comes in
            # time is always recorded, and one that does not is an ordinary retry.
            async with asyncio.timeout(self.settings.upstream_timeout):
                response = await self.upstream.request(
                    "GET", f"v1/lipsync/requests/{quote(request_id, safe='')}"
                )
        except (UpstreamError, TimeoutError) as exc:
            POLLS.labels("unreachable").inc()
            reason = exc.message if isinstance(exc, UpstreamError) else "no answer in time"
            log.warning("poll failed", extra={"request_id": request_id, "reason": reason})
            await self._retry_later(job)
            return

        status = response.status_code
        POLLS.labels(POLL_RESULTS.get(status, "error")).inc()
        if status == 200:
            tracer = setup.active()
            if tracer is not None and job.trace:
                await self._observe_traced(tracer, job, response, started)
            else:
                await self.observe(job, response.content)
        elif status == 404:
            await self._not_found(job)
        elif status == 429:
            pause = await self.schedule.pause_for_429(
                parse_retry_after(response.headers), met_by="a poll"
            )
            await self.store.record_poll(
                request_id,
                next_in=pause,
                interval=job.interval,
                not_found_since=job.not_found_since,
            )
        else:
            if status in (401, 403):
                log.error("Chamelaion rejected CHAMELAION_API_KEY while polling; check the key")
            else:
                log.warning("poll got an error", extra={"request_id": request_id, "status": status})
            await self._retry_later(job)

    async def _observe_traced(
        self, tracer: Tracer, job: Job, response: httpx.Response, started: int
    ) -> None:
        """`observe` an answer within the poll's span, which is kept (ended, so exported) only
        when the poll moved the job: a trace shows the polls that mattered, not every one."""
        url = response.request.url
        span = tracer.start_span(
            "GET",
            context=spans.restore(job.trace),
            kind=SpanKind.CLIENT,
            start_time=started,
            attributes={
                **spans.client_attributes("GET", url.scheme, url.host, url.port),
                "url.template": "/v1/lipsync/requests/{id}",
                "http.response.status_code": response.status_code,
                "relay.job.id": job.request_id,
            },
        )
        with trace.use_span(span, end_on_exit=False):
            moved = await self.observe(job, response.content)
        if moved:
            span.end()

    def needs_wrap_up(self, job: Job) -> bool:
        """True when the job needs more than a status recorded (it ended, or is past its
        maximum age): `wrap_up` it, then `observe` what upstream says."""
        return job.ended or self._overdue(job) > 0

    def _overdue(self, job: Job) -> float:
        """Seconds the job is past its maximum age (negative: not yet)."""
        return job.read_at - job.created - self.settings.max_job_age

    async def wrap_up(self, job: Job) -> bool:
        """Finish what needs no upstream answer (a job that ended is handed over, one past its
        age and grace given up); True when the job needs no status any more."""
        if job.ended:
            # A worker ended it but died before handing the delivery over: finish that part.
            await self._finish_end(job, deliver=self.delivery_pending(job))
            return True
        overdue = self._overdue(job)
        if overdue > self.settings.not_found_grace:
            # Bounded life, even when Chamelaion never answers: the job must not be polled (and
            # kept) forever. A job that got an answer past its maximum age ended with it.
            await self._give_up(
                job,
                "the relay could not read its final status: Chamelaion gave no usable answer "
                f"in the {int(overdue)} s after it reached the maximum age of "
                f"{int(self.settings.max_job_age)} s",
            )
            return True
        return False

    async def _retry_later(self, job: Job, *, not_found_since: float | None = None) -> None:
        """Poll again after a longer interval; `not_found_since` defaults to the job's own."""
        interval = self._longer(job.interval)
        await self.store.record_poll(
            job.request_id,
            next_in=jittered(interval),
            interval=interval,
            not_found_since=not_found_since or job.not_found_since,
        )

    async def observe(self, job: Job, raw: bytes, *, hold: float = 0.0) -> bool:
        """Handle a LipsyncRequest seen for `job`, from its own GET or from a list page; True
        when it moved the job (a new status, or its end).

        `hold`: the least time before the job's next per-id poll (a sweep that saw it will see
        it again before then).
        """
        data = self._usable(job, raw)
        if data is None:
            log.warning("poll got an unusable body", extra={"request_id": job.request_id})
            await self._retry_later(job)
            return False
        new_status: str = data["status"]
        if event_type(new_status) is not None:
            return await self._end(job, new_status, data)
        if self._overdue(job) > 0:
            # Its final look: past its maximum age and still unfinished upstream.
            age = int(job.read_at - job.created)
            return await self._give_up(
                job, f"Chamelaion did not finish this request within {age} s", last=data
            )
        if self._starts_processing(job, new_status):
            await self._emit_processing(job, data)
        record = self._record(job, raw, new_status, hold)
        await self.store.record_poll(
            record.request_id,
            next_in=record.next_in,
            interval=record.interval,
            status=record.status,
            body=record.body,
        )
        return new_status != job.status

    def plan(self, job: Job, raw: bytes, *, hold: float = 0.0) -> PollRecord | None:
        """What to store for a status that only moves the job along; None when the status
        needs `observe` (it ends the job, sends an event, or is unusable)."""
        data = self._usable(job, raw)
        if data is None:
            return None
        new_status: str = data["status"]
        if event_type(new_status) is not None or self._starts_processing(job, new_status):
            return None
        return self._record(job, raw, new_status, hold)

    @staticmethod
    def _usable(job: Job, raw: bytes) -> dict[str, Any] | None:
        """The LipsyncRequest in `raw` when it is one, of this job, with a status; else None.

        A body that names no job, or another, is not taken for this job's status: its callback
        would not say which job it is about (a proxy's stale page, a malformed answer).
        """
        data = json_object(raw) if len(raw) <= MAX_BODY_BYTES else None
        if data is None or data.get("id") != job.request_id:
            return None
        return data if isinstance(data.get("status"), str) else None

    def _record(self, job: Job, raw: bytes, new_status: str, hold: float) -> PollRecord:
        # The interval drops to the minimum on a change and grows while nothing changes.
        changed = new_status != job.status
        interval = self.settings.poll_min_interval if changed else self._longer(job.interval)
        return PollRecord(
            job.request_id,
            next_in=max(jittered(interval), hold),
            interval=interval,
            status=new_status,
            body=raw,
        )

    def _starts_processing(self, job: Job, new_status: str) -> bool:
        """The job just moved to `processing` and its callback wants to hear of it."""
        return (
            new_status == "processing"
            and new_status != job.status
            and job.callback_url is not None
            and PROCESSING in job.events
        )

    async def _emit_processing(self, job: Job, data: dict[str, Any]) -> None:
        """Start delivering `lipsync.processing` (once: a repeated sighting creates nothing)."""
        assert job.callback_url is not None
        delivery_id = await self.emit(
            job,
            kind="processing",
            event_id=webhook_id(job.request_id, PROCESSING),
            event=build_event(PROCESSING, data, job.metadata),
            retention=self.settings.job_retention,
        )
        # Not created: already emitted, or the job ended meanwhile.
        if delivery_id is not None:
            await self.hand_over(delivery_id, job.callback_url)

    async def _not_found(self, job: Job) -> None:
        now = job.read_at
        since = job.not_found_since or now
        if now - since < self.settings.not_found_grace:
            await self._retry_later(job, not_found_since=since)
            return
        await self._give_up(
            job,
            f"Chamelaion no longer knows this request: it answered 404 for {int(now - since)} s",
        )

    async def _give_up(self, job: Job, reason: str, *, last: dict[str, Any] | None = None) -> bool:
        """End the job as failed on the relay's own account, from its last known state (`last`,
        else the stored one); True when this call ended it."""
        if last is None:
            last = (json_object(job.body) if job.body else None) or {}
        data = {
            **last,
            "id": last.get("id", job.request_id),
            "status": "failed",
            "error_message": f"{reason}, so the relay gave it up",
        }
        return await self._end(job, "failed", data)

    async def _end(self, job: Job, status: str, data: dict[str, Any]) -> bool:
        """Record the job's end (and hand its delivery over); True when this call ended it."""
        type_ = event_type(status)
        assert type_ is not None
        body = orjson.dumps(data)
        deliver = bool(job.callback_url) and type_ in job.events
        ended = await self.store.end(
            job,
            status=status,
            body=body,
            event_id=webhook_id(job.request_id, type_),
            event=build_event(type_, data, job.metadata),
            retention=self.settings.job_retention,
            deliver=deliver,
        )
        if ended:  # not when another worker's end came first
            JOBS_ENDED.labels(status, caller_label(job.caller)).inc()
            # The common case, counted in metrics: not a line each unless RELAY_LOG_LEVEL=debug.
            log.debug("job ended", extra={"request_id": job.request_id, "status": status})
            if job.trace and (tracer := setup.active()) is not None:
                _end_span(tracer, job, status, type_)
        # Out of the poll queue already (store.end.lua): should this worker die before the
        # hand-over, the stranded-delivery sweep queues the attempt (the delivery is filed as
        # pending).
        # Only the call that ended the job hands it over: two workers that saw the end at once
        # (a sweep and a poll) would otherwise both send the first attempt.
        if ended and deliver and job.callback_url:
            await self.hand_over(job.request_id, job.callback_url)
        return ended

    async def _finish_end(self, job: Job, *, deliver: bool) -> None:
        """Finish ending a job whose end was recorded while it stayed in the poll queue."""
        # Enqueue before unscheduling: a crash in between leaves the job claimable, and the
        # enqueue is idempotent (fixed arq job id), so the retry cannot duplicate the delivery.
        if deliver and job.callback_url:
            await self.hand_over(job.request_id, job.callback_url)
        await self.schedule.unschedule(job.request_id)


def _end_span(tracer: Tracer, job: Job, status: str, event: str) -> None:
    """The job's end, in its trace: linked to the poll or sweep page that saw it (the current
    span, which a page shares with the other jobs it moved)."""
    seen_by = trace.get_current_span().get_span_context()
    tracer.start_span(
        "job end",
        context=spans.restore(job.trace),
        links=[Link(seen_by)] if seen_by.is_valid else None,
        attributes={
            "relay.job.id": job.request_id,
            "relay.job.status": status,
            "relay.event.type": event,
        },
    ).end()
