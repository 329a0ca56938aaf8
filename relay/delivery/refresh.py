"""Fresh output links for late attempts: an ended job re-read from Chamelaion before sending.

Chamelaion's `output_url` may be a link that expires (a signed storage URL), while a callback
is retried, or redelivered, for days after its job ended. So an attempt at a
`lipsync.completed` event made more than RELAY_REFRESH_AFTER after the job ended first asks
Chamelaion for the job again (`GET /v1/lipsync/requests/{id}`) and sends its answer as `data`.
The rest of the event is the stored one (type, timestamp, metadata) and so is its webhook-id:
receivers still deduplicate on it. The answer is not stored: a later late attempt asks again.

The re-read is a status read like any other: it books a slot of the shared upstream budget
(relay.jobs.schedule.StatusReadBudget), none is made while a 429 pause is on, and a 429 it
meets pauses everyone. It is bounded by `refresh_timeout`, which arq's job timeout includes. A
first attempt made in-process (relay.delivery.first_attempts) is made as its job ends, so never
late: it does not re-read, and its guard in arq keeps its timing. Whatever goes wrong (a pause,
no slot in time, a failure, an answer that is not this job as it ended) the stored object is
sent, and the attempt log says why (`refresh: failed`, `refresh_error`).

Why 600 s by default: Chamelaion does not say how long its links last. Signed storage links
commonly last an hour (boto3's default for presigned S3 URLs) or more, so one sent within ten
minutes of the job's end still has most of its life, and sending it costs no upstream call.
With the default retry schedule that covers the first three attempts (at once, 5 s, ~5 min),
nearly every delivery; later ones (a receiver down for half an hour or more, a redelivery
asked the next day) re-read, one status read each. `lipsync.failed` carries no link and is
never re-read; nor is `lipsync.processing`, sent only while its job runs.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import orjson

from relay.errors import UpstreamError
from relay.jobs.events import event_type_of
from relay.jobs.poller import MAX_BODY_BYTES
from relay.jobs.store import Job
from relay.metrics import OUTPUT_REFRESHES
from relay.settings import Settings
from relay.upstream import Upstream, json_object

log = logging.getLogger(__name__)

REFRESHED_EVENT = "lipsync.completed"  # the one event with an output link
# The longest a re-read may take, budget wait and call together: an attempt waits for it.
MAX_REFRESH_SECONDS = 10.0


def refresh_timeout(settings: Settings) -> float:
    """How long a late attempt's re-read may take at most; 0 when re-reads are off."""
    if not settings.refresh_after:
        return 0.0
    return min(settings.upstream_timeout, MAX_REFRESH_SECONDS)


class RefreshFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Refreshed:
    """The event to send, and what the attempt log should say of the re-read (empty: none)."""

    event: bytes
    entry: dict[str, str] = field(default_factory=dict)


class Refresher:
    def __init__(self, upstream: Upstream, *, after: float, timeout: float) -> None:
        # `upstream` spends the shared budget on every call (Upstream.with_budget).
        self.upstream = upstream
        self.after = after
        self.timeout = timeout

    def due(self, job: Job) -> bool:
        """The job's final event carries an output link and this read of it is late."""
        return (
            job.ended_at is not None
            and job.read_at - job.ended_at > self.after
            and event_type_of(job.event) == REFRESHED_EVENT
        )

    async def event(self, job: Job) -> Refreshed:
        """The job's final event to send now: with Chamelaion's current answer as `data` when
        the attempt is late, else (or when that answer cannot be had) as stored."""
        assert job.event is not None
        if not self.due(job):
            return Refreshed(job.event)
        try:
            data = await self._read(job)
        except RefreshFailed as exc:
            OUTPUT_REFRESHES.labels("failed").inc()
            log.warning(
                "a late attempt could not re-read its job; the stored object is sent",
                extra={"request_id": job.request_id, "reason": exc.reason},
            )
            return Refreshed(job.event, {"refresh": "failed", "refresh_error": exc.reason})
        envelope = orjson.loads(job.event)
        envelope["data"] = data
        OUTPUT_REFRESHES.labels("refreshed").inc()
        return Refreshed(orjson.dumps(envelope), {"refresh": "refreshed"})

    async def _read(self, job: Job) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self.timeout):
                response = await self.upstream.request(
                    "GET", f"v1/lipsync/requests/{quote(job.request_id, safe='')}"
                )
        except TimeoutError:
            raise RefreshFailed(f"no answer within {self.timeout:g} s") from None
        except UpstreamError as exc:  # a 429 pause included: nothing was sent then
            raise RefreshFailed(exc.message) from None
        if response.status_code != 200:
            raise RefreshFailed(f"Chamelaion answered HTTP {response.status_code}")
        raw = response.content
        data = json_object(raw) if len(raw) <= MAX_BODY_BYTES else None
        # Only this job, as it ended: a proxy's stale page or another job's answer is no
        # fresher link, and a status that moved is not the event this is.
        if data is None or data.get("id") != job.request_id or data.get("status") != job.status:
            raise RefreshFailed("Chamelaion's answer is not this job as it ended")
        return data
