"""Signed callbacks: one attempt per arq job, the next attempt enqueued on failure.

Each attempt is its own arq job with a fixed id (`deliver:{request_id}:{attempt}`) deferred by
the retry schedule, rather than one job retried with arq's Retry: arq drops a job about a day
after it was due, and the schedule spans three days. The job hash records which attempt is
awaited, so a re-run of an old attempt (after a worker crash) does nothing once a later one is
scheduled or the delivery is settled.

Outcomes, after Standard Webhooks: any 2xx is success; 410 means the receiver is gone for good;
everything else (3xx, which is never followed, 4xx, 429, 5xx, timeouts, refused connections) is
retried on the schedule, waiting at least as long as a Retry-After asks.

Every attempt holds one of its destination's slots while it runs (relay.delivery.destinations),
shared fairly among the jobs' callers, and reads the job only once it holds one, so two runs of
one attempt in one worker never both send. An attempt for a destination that is backed off (its
host kept failing to answer: see `Outcome.answered`) is not made and not counted: it is
postponed, as a new arq job, to when the destination may be tried again, so no event is lost
however long the receiver is down; the attempt log says so.

An attempt at `lipsync.completed` made long after its job ended sends the job as Chamelaion
answers for it now, for a fresh output_url (relay.delivery.refresh), under the same webhook-id.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import httpx
from arq import Retry
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from relay.delivery.attempt_log import EXCERPT_CHARS, AttemptLog
from relay.delivery.destinations import Destinations, destination_of
from relay.delivery.failure import FailureClass, failure_class
from relay.delivery.netpolicy import parse_callback_url
from relay.delivery.ops_events import OpsEvents, last_attempt
from relay.delivery.refresh import Refresher
from relay.delivery.signers import CallerSigners
from relay.delivery.store import Breaker, Delivery, DeliveryId, DeliveryState, DeliveryStore
from relay.delivery.transport import CallbackClient
from relay.errors import DestinationRefused
from relay.jitter import jittered
from relay.jobs.events import PROCESSING, event_type_of
from relay.jobs.store import Job, JobStore
from relay.metrics import CALLER_DELIVERIES, DELIVERIES, DELIVERY_LATENCY, caller_label
from relay.redis import stats
from relay.redis.batch import ScriptCall
from relay.tracing import setup, spans
from relay.upstream import USER_AGENT, parse_retry_after

if TYPE_CHECKING:  # the SDK is imported only once tracing starts
    from relay.tracing.tracer import Tracer

log = logging.getLogger(__name__)

# How long an ended job outlives the attempt scheduled furthest out, at the least.
KEEP_AFTER_LAST_ATTEMPT = 86400.0
# The longest Retry-After honoured: past this the schedule's own timing is kept.
MAX_RETRY_AFTER = 86400.0

# Answers that speak for the host rather than the path: a gateway with nothing behind it.
HOST_UNWELL = frozenset({502, 503, 504})

# Given up after every attempt is an operator's problem; a receiver that is gone is its own.
SETTLED_LOG_LEVEL = {"delivered": logging.INFO, "gone": logging.WARNING, "failed": logging.ERROR}

# (request_id, attempt, delay, destination): enqueue that attempt as an arq job.
# How much longer than an attempt's timeout its early event's sending key is held.
SEND_MARGIN = 5.0

_DETAIL = {
    "timeout": "timed out",
    "refused": "could not connect (refused)",
    "reset": "the connection was reset or closed before an answer",
    "protocol": "the answer was not well-formed HTTP",
}

EnqueueAttempt = Callable[[str, int, float, str], Awaitable[None]]
# (request_id, attempt, delay, destination): enqueue a postponed run of that attempt.
Postpone = Callable[[str, int, float, str], Awaitable[None]]


@dataclass(frozen=True)
class Outcome:
    kind: Literal["delivered", "gone", "retry"]
    detail: str
    retry_after: float | None = None
    # The receiver's host answered for itself: its destination is up, whatever it thought of
    # this one event (a path's 500 or 4xx is that path's business). Only what says the host
    # is unwell counts against it: no connection, a timeout, a reset, or a gateway's 502, 503
    # or 504 (many services sit behind one gateway host).
    answered: bool = False
    # For the attempt log: the receiver's status, or the kind of failure, and its answer's start.
    status: int | None = None
    error: FailureClass | None = None
    excerpt: str = ""


def classify(response: httpx.Response, excerpt: str = "") -> Outcome:
    status = response.status_code
    if 200 <= status < 300:
        return Outcome("delivered", f"HTTP {status}", answered=True, status=status, excerpt=excerpt)
    if status == 410:
        return Outcome(
            "gone", "HTTP 410: the receiver is gone", answered=True, status=status, excerpt=excerpt
        )
    if 300 <= status < 400:
        return Outcome(
            "retry",
            f"HTTP {status}: redirects are not followed",
            answered=True,
            status=status,
            excerpt=excerpt,
        )
    if status == 429 or status >= 500:
        return Outcome(
            "retry",
            f"HTTP {status}",
            parse_retry_after(response.headers),
            answered=status not in HOST_UNWELL,
            status=status,
            excerpt=excerpt,
        )
    return Outcome("retry", f"HTTP {status}", answered=True, status=status, excerpt=excerpt)


async def read_excerpt(response: httpx.Response) -> str:
    """The start of a receiver's answer, for the attempt log; the rest is never read."""
    if response.status_code == 204 or response.headers.get("content-length") == "0":
        return ""  # nothing to read: the usual answer, spared three layers of stream set-up
    taken = b""
    async for chunk in response.aiter_raw():
        taken += chunk
        if len(taken) >= EXCERPT_CHARS:
            break
    return taken[:EXCERPT_CHARS].decode("utf-8", "replace")


def next_delay(schedule: tuple[float, ...], attempt: int, retry_after: float | None) -> float:
    """Wait before `attempt` (0-based): the schedule's step with ±10 % jitter, or Retry-After."""
    delay = jittered(schedule[attempt])
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
    return delay


class Deliverer:
    def __init__(
        self,
        *,
        store: JobStore,
        deliveries: DeliveryStore,
        signers: CallerSigners,
        client: CallbackClient,
        schedule: tuple[float, ...],
        enqueue_attempt: EnqueueAttempt,
        postpone: Postpone,
        destinations: Destinations,
        breaker: Breaker,
        attempt_log: AttemptLog,
        timeout: float,
        refresher: Refresher | None = None,
        ops: OpsEvents | None = None,
    ) -> None:
        # Where operational events go (RELAY_OPS_WEBHOOK_URL); None: nowhere.
        self.ops = ops
        self.attempt_log = attempt_log
        # Re-reads late final events (RELAY_REFRESH_AFTER); None: never.
        self.refresher = refresher
        self.timeout = timeout
        self.store = store
        self.deliveries = deliveries
        self.signers = signers
        self.client = client
        self.schedule = schedule
        self.enqueue_attempt = enqueue_attempt
        self.postpone = postpone
        self.destinations = destinations
        self.breaker = breaker
        self.outcomes = stats.OutcomeCounter(store.redis)

    async def attempt(
        self,
        request_id: str,
        attempt: int,
        destination: str | None = None,
        *,
        wait: float | None = None,
        refresh: bool = True,
    ) -> str:
        """Make delivery attempt number `attempt` (0-based); returns what happened, for arq.

        `destination`: the callback URL's, when the caller knows it (read from the job if not).
        `wait`: how long to queue for a slot at most (DestinationBusy after); None: no limit.
        `refresh`: a late final event may re-read its job first (relay.delivery.refresh).
        """
        if destination is None:
            job = await self.store.get(request_id)
            if job is None or not job.callback_url:
                return "stale"
            destination = destination_of(job.callback_url)
        backed_off_for = self.destinations.backed_off_for(destination)
        if backed_off_for == 0 and self.destinations.half_open(destination):
            # Its back-off has ended: one attempt of all the workers' tries it (the probe),
            # the others wait for its outcome. Only here, never with the breaker closed, does
            # the breaker cost a round trip.
            probe = await self.deliveries.claim_probe(
                destination, hold=self.timeout + SEND_MARGIN, wait=self.breaker.base
            )
            if not probe.go:
                backed_off_for = probe.wait
                self.destinations.record(destination, probe.wait)
            elif probe.wait == 0:
                self.destinations.record(destination, 0)  # closed: no more asking
            # The probe leaves this worker's view half-open: its other attempts ask too, and
            # its outcome tells of a new back-off as the first did (ops events).
        if backed_off_for > 0:
            # Not made, not counted: the event waits for the destination, however long. Its
            # log says so, or a caller would see nothing happen for minutes.
            delay = jittered(backed_off_for)
            await self.postpone(request_id, attempt, delay, destination)
            await self.attempt_log.postponed(request_id, attempt=attempt, next_in=delay)
            DELIVERIES.labels("postponed").inc()
            return "postponed"
        owner = await self.deliveries.owner(DeliveryId.parse(request_id))
        async with self.destinations.slot(destination, owner=owner, wait=wait):
            return await self._attempt(request_id, attempt, destination, refresh=refresh)

    async def _attempt(
        self, request_id: str, attempt: int, destination: str, *, refresh: bool
    ) -> str:
        job = await self.store.get(request_id)
        if job is None:
            return "stale"
        seen = Delivery.of(job)  # from the same read as the job
        if seen.pending and seen.attempt == attempt - 1:
            # The previous attempt enqueued this one but has not recorded its outcome yet (it
            # crashed or is retrying a Redis error): wait for it, or this attempt is lost.
            raise Retry(defer=5)
        if not seen.pending or seen.attempt != attempt:
            return "stale"
        if not (job.callback_url and job.event and job.event_id):
            return "stale"
        delivery = DeliveryId.parse(request_id)
        event, refreshed = job.event, {}
        began = time.monotonic()
        if refresh and delivery.early is None and self.refresher is not None:
            fresh = await self.refresher.event(job)
            event, refreshed = fresh.event, fresh.entry
        started = time.monotonic()
        # The Redis clock when the POST began: the record's read time plus any re-read.
        sent_at = job.read_at + (started - began)
        # The stored event's type, for the span, the records and the log: its JSON read once.
        event_type = event_type_of(job.event)
        tracer = setup.active()
        span, carried = None, None
        if tracer is not None and job.trace:
            span = _attempt_span(tracer, job, attempt, destination, delivery.request_id, event_type)
            # The receiver's spans continue the job's trace, under this attempt.
            carried = tracer.headers(span)
        if delivery.early is not None:
            # An early event: sent only while its job runs, never after the final one.
            if not await self.deliveries.claim_send(delivery, hold=self.timeout + SEND_MARGIN):
                log.info("early event dropped as stale: the job ended", extra={"id": request_id})
                return "stale"
            try:
                outcome = await self._post(
                    job.callback_url, job.event_id, event, job.caller, carried
                )
            finally:
                await self.deliveries.release_send(delivery)
        else:
            if PROCESSING in job.events:
                # Only a job whose callback asked for an early event can have one in flight.
                await self._after_early_events(request_id)
            outcome = await self._post(job.callback_url, job.event_id, event, job.caller, carried)
        duration = time.monotonic() - started
        log_extra = {"request_id": request_id, "attempt": attempt, "result": outcome.detail}
        if outcome.kind == "delivered" and job.ended_at is not None:
            # On the Redis clock, like `ended_at`: the record's read time plus the attempt.
            DELIVERY_LATENCY.observe(max(0.0, sent_at + duration - job.ended_at))
        following = attempt + 1
        # A redelivery starts the schedule again from its own attempt number.
        step = following - seen.schedule_base
        settled: DeliveryState | None = None
        if outcome.kind != "retry":
            settled = outcome.kind
        elif step >= len(self.schedule):
            settled = "failed"
        # One sample per attempt: the last failing one counts as failed, not also as retry.
        DELIVERIES.labels(settled or "retry").inc()
        CALLER_DELIVERIES.labels(caller_label(job.caller), settled or "retry").inc()
        if span is not None:
            _end_attempt_span(span, outcome, settled or "retry")
        counted = self.outcomes.count_call("delivered" if settled == "delivered" else "failed")
        if settled is not None:
            logged = self._entry(
                job,
                event_type,
                attempt,
                outcome,
                duration,
                settled,
                next_in=None,
                sent_at=sent_at,
                **refreshed,
            )
            recorded = await self._record(
                request_id,
                attempt,
                attempt,
                settled,
                outcome,
                destination,
                event_type=event_type or "",
                then=[logged, counted],
            )
            if settled == "failed" and recorded and self.ops is not None:
                self.ops.exhausted(
                    job_id=delivery.request_id,
                    delivery_id=request_id,
                    event_type=event_type,
                    webhook_id=job.event_id,
                    destination=destination,
                    attempts=seen.attempts_made + 1,
                    last=self._last(attempt, outcome),
                )
            # A first-try success is the common case, counted in metrics: not a line each.
            level = logging.DEBUG if settled == "delivered" and following == 1 else None
            log.log(
                level or SETTLED_LOG_LEVEL[settled],
                "callback %s after %d attempts",
                settled,
                following,
                extra=log_extra,
            )
            return settled
        delay = next_delay(self.schedule, step, outcome.retry_after)
        # Enqueue first, then record: a crash in between re-runs this attempt (a duplicate
        # delivery with the same webhook-id, which at-least-once allows) and never loses one.
        await self.enqueue_attempt(request_id, following, delay, destination)
        await self._record(
            request_id,
            attempt,
            following,
            "pending",
            outcome,
            destination,
            event_type=event_type or "",
            keep_for=delay + KEEP_AFTER_LAST_ATTEMPT,
            then=[
                self._entry(
                    job,
                    event_type,
                    attempt,
                    outcome,
                    duration,
                    "failing",
                    next_in=delay,
                    sent_at=sent_at,
                    **refreshed,
                ),
                counted,
            ],
        )
        log.warning("callback failed, retrying in %.0f s", delay, extra=log_extra)
        return "retry"

    async def _after_early_events(self, request_id: str) -> None:
        """Wait while an early event of this job is being sent, so the final one comes after
        it; bounded by that attempt's own timeout (the key expires if its worker died)."""
        deadline = time.monotonic() + self.timeout + SEND_MARGIN
        # Polled: the condition lives in Redis, shared by every worker.
        while await self.deliveries.sending(request_id) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    def _entry(
        self,
        job: Job,
        event_type: str | None,
        attempt: int,
        outcome: Outcome,
        duration: float,
        state: str,
        *,
        next_in: float | None,
        sent_at: float,
        **more: str,
    ) -> ScriptCall:
        """The attempt log's entry for this attempt, recorded along with its outcome; `more`:
        what it says of a re-read (relay.delivery.refresh)."""
        return self.attempt_log.record_call(
            job.request_id,
            event=event_type,
            attempt=attempt,
            duration_ms=round(duration * 1000, 1),
            status=outcome.status,
            error=outcome.error,
            detail=outcome.detail,
            excerpt=outcome.excerpt,
            next_at=None if next_in is None else round(sent_at + duration + next_in, 3),
            state=state,
            **more,
        )

    async def _record(
        self,
        request_id: str,
        attempt: int,
        next_attempt: int,
        state: DeliveryState,
        outcome: Outcome,
        destination: str,
        *,
        event_type: str,
        keep_for: float = 0,
        then: Sequence[ScriptCall] = (),
    ) -> bool:
        """Record the outcome, then the `then` calls (its log entry and count), in one round
        trip: a burst's attempts each wait for Redis once, not three times. True when the
        outcome was recorded (the delivery still waited on this attempt)."""
        update = await self.deliveries.record_outcome(
            request_id,
            attempt=attempt,
            next_attempt=next_attempt,
            state=state,
            result=outcome.detail,
            destination=destination,
            answered=outcome.answered,
            breaker=self.breaker,
            event_type=event_type,
            keep_for=keep_for,
            then=then,
        )
        was_backed_off = self.destinations.backed_off_for(destination) > 0
        self.destinations.record(destination, update.backed_off_for)
        if update.backed_off_for > 0 and not was_backed_off and self.ops is not None:
            # Once per back-off as this worker sees it: the attempts that fail while it lasts
            # (already in flight when it began) extend nothing worth another notice.
            self.ops.backed_off(
                destination=destination,
                seconds=update.backed_off_for,
                job_id=DeliveryId.parse(request_id).request_id,
                delivery_id=request_id,
                last=self._last(attempt, outcome),
            )
        return update.recorded

    def _last(self, attempt: int, outcome: Outcome) -> dict[str, object]:
        assert self.ops is not None
        return last_attempt(
            attempt,
            status=outcome.status,
            error=outcome.error,
            detail=outcome.detail,
            at=self.ops.clock(),
        )

    async def _post(
        self,
        url: str,
        event_id: str,
        event: bytes,
        caller: str | None = None,
        carried: dict[str, str] | None = None,
    ) -> Outcome:
        # The caller's own callback_hosts, on top of the network policy: checked again here, as
        # the callers file may have changed since the job was submitted.
        owner = self.signers.caller(caller)
        if owner is not None and not owner.allows_host(parse_callback_url(url).host):
            return Outcome(
                "retry",
                f"refused: the host is not one of caller {owner.name}'s callback_hosts",
                error="policy",
            )
        signer = self.signers.signer(caller)
        assert signer is not None, "a worker always has RELAY_WEBHOOK_SECRETS"
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            **signer.headers(event_id, event),
        }
        if carried:  # an attempt's trace context (W3C headers)
            headers.update(carried)
        try:
            # One deadline for the whole attempt: the transport's timeouts are per operation,
            # and arq cancels (and records as failed) a job that outlives its own timeout.
            async with (
                asyncio.timeout(self.timeout),
                self.client.post(url, event, headers) as response,
            ):
                # Only the start is read, for the attempt log, and only when it keeps it: a
                # reply may be huge, or an internal service's secrets.
                excerpt = await read_excerpt(response) if self.attempt_log.excerpts else ""
                return classify(response, excerpt)
        except TimeoutError as exc:
            return Outcome("retry", "timed out", error=failure_class(exc))
        except DestinationRefused as exc:
            return Outcome(
                "retry", f"refused by the callback network policy: {exc.reason}", error="policy"
            )
        except httpx.HTTPError as exc:
            kind = failure_class(exc)
            return Outcome("retry", _DETAIL.get(kind, f"could not connect ({kind})"), error=kind)
        except Exception as exc:
            # Anything else (a URL httpx cannot build, a bug) is this attempt's failure, on the
            # record like any other: raised, arq would re-run the attempt over and over.
            log.exception("callback attempt failed unexpectedly")
            return Outcome("retry", f"unexpected error: {type(exc).__name__}", error="error")


def _attempt_span(
    tracer: Tracer,
    job: Job,
    attempt: int,
    destination: str,
    request_id: str,
    event_type: str | None,
) -> Span:
    """One attempt's span in its job's trace: where it went (scheme, host, port, read from
    its `destination`: never the callback URL's path or query, which may hold a receiver's
    token)."""
    return tracer.start_span(
        "POST",
        context=spans.restore(job.trace),
        kind=SpanKind.CLIENT,
        attributes={
            **_server_attributes(destination),
            "relay.job.id": request_id,
            "relay.event.type": event_type or "",
            "relay.delivery.attempt": attempt,
        },
    )


@functools.lru_cache(maxsize=1024)
def _server_attributes(destination: str) -> dict[str, str | int]:
    """An attempt span's attributes for its destination (`scheme://host:port`, as
    destinations.destination_of writes it): a few destinations, read again for every attempt
    (each callback URL is a job's own, so parsing it was parsing it afresh every time)."""
    scheme, _, rest = destination.partition("://")
    host, _, port = rest.rpartition(":")
    return spans.client_attributes(
        "POST", scheme, host.removeprefix("[").removesuffix("]"), int(port)
    )


def _end_attempt_span(span: Span, outcome: Outcome, result: str) -> None:
    """Its outcome on the attempt's span (`result`: delivered, gone, failed or retry)."""
    span.set_attribute("relay.delivery.outcome", result)
    if outcome.status is not None:
        span.set_attribute("http.response.status_code", outcome.status)
    if outcome.kind != "delivered":
        # Client spans: a status of 400 or more, or no answer, is an error.
        span.set_attribute("error.type", outcome.error or str(outcome.status))
        span.set_status(Status(StatusCode.ERROR, outcome.detail))
    span.end()
