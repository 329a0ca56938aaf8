"""The sandbox upstream's memory: its settings, jobs, injected faults, rate limit and call log.

Everything lives in one `SandboxState` per app instance, touched only from the event loop that
serves it, so it needs no locks. A job's status is worked out from its age each time it is read
(queued, then processing, then completed or failed), so there is no background task to run.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

FAILURE_MESSAGE = "video URL is not accessible"
OUTPUT_URL = "https://storage.chamelaion.example/output/{id}.mp4"
_KNOWN_STATUSES = ("queued", "processing", "completed", "failed")
_TIMESTAMPS_KEPT = 10_000  # per route: enough for any rate check, bounded for a long `relay dev`


@dataclass(frozen=True)
class SandboxConfig:
    api_keys: tuple[str, ...] = ("sandbox-key",)
    queued_seconds: float = 1.0
    processing_seconds: float = 2.0
    rate_limit_per_second: float | None = None

    def __post_init__(self) -> None:
        if not self.api_keys or not all(self.api_keys):
            raise ValueError("SandboxConfig.api_keys needs at least one non-empty key")
        if self.queued_seconds < 0 or self.processing_seconds < 0:
            raise ValueError("SandboxConfig durations cannot be negative")
        if self.rate_limit_per_second is not None and self.rate_limit_per_second <= 0:
            raise ValueError("SandboxConfig.rate_limit_per_second must be positive or None")


@dataclass
class UpstreamJob:
    id: str
    created_at: datetime
    created_monotonic: float
    reference_id: str | None
    fails: bool
    json_body: bytes | None = None
    uploads: dict[str, Any] | None = None
    pinned_status: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)


@dataclass
class Fault:
    """The next `remaining` matching calls are delayed and/or answered with `status`."""

    status: int | None
    remaining: int
    paths: str  # "poll", "generate", "all", or one route key such as "GET /health"
    retry_after: float | None = None
    delay: float = 0.0
    after_handling: bool = False  # handle the call (create the job), then answer the error
    error: str | None = None

    def matches(self, key: str, group: str) -> bool:
        return self.paths in ("all", group, key)


class TokenBucket:
    """`rate` tokens a second, bursting to one second's worth; a call takes one token."""

    def __init__(self, rate: float, clock: Callable[[], float]) -> None:
        self._rate = rate
        self._capacity = max(1.0, rate)
        self._clock = clock
        self._tokens = self._capacity
        self._updated = clock()

    def take(self) -> float:
        """0 when a token was taken, else the seconds until one will be there."""
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._updated) * self._rate)
        self._updated = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self._rate


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def retry_after_header(seconds: float) -> str:
    # Whole seconds is the HTTP form; a fractional value from a test is passed on as given.
    return str(int(seconds)) if seconds == int(seconds) else str(seconds)


class SandboxState:
    def __init__(self, config: SandboxConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self._clock = clock
        self.reset()

    def reset(self) -> None:
        self.jobs: dict[str, UpstreamJob] = {}  # insertion order is creation order
        self.faults: list[Fault] = []
        self.calls: Counter[str] = Counter()
        self.timestamps: dict[str, deque[float]] = {}
        rate = self.config.rate_limit_per_second
        self._bucket = TokenBucket(rate, self._clock) if rate is not None else None

    def record_call(self, key: str) -> None:
        self.calls[key] += 1
        self.timestamps.setdefault(key, deque(maxlen=_TIMESTAMPS_KEPT)).append(self._clock())

    def take_fault(self, key: str, group: str) -> Fault | None:
        for fault in self.faults:
            if fault.matches(key, group):
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self.faults.remove(fault)
                return fault
        return None

    def rate_limit_wait(self) -> float | None:
        """None when the call may go ahead, else whole seconds to wait (at least 1)."""
        if self._bucket is None:
            return None
        wait = self._bucket.take()
        return float(max(1, math.ceil(wait))) if wait > 0 else None

    def create_job(
        self,
        *,
        reference_id: str | None,
        fails: bool,
        json_body: bytes | None = None,
        uploads: dict[str, Any] | None = None,
    ) -> UpstreamJob:
        job = UpstreamJob(
            id=str(uuid.uuid4()),
            created_at=datetime.now(UTC),
            created_monotonic=self._clock(),
            reference_id=reference_id,
            fails=fails,
            json_body=json_body,
            uploads=uploads,
        )
        self.jobs[job.id] = job
        return job

    def find(self, id_or_reference: str) -> UpstreamJob | None:
        """By request id, else the newest job with that reference_id, like Chamelaion."""
        if id_or_reference in self.jobs:
            return self.jobs[id_or_reference]
        for job in reversed(self.jobs.values()):
            if job.reference_id == id_or_reference:
                return job
        return None

    def newest_first(self, reference_id: str | None) -> list[UpstreamJob]:
        return [
            job
            for job in reversed(self.jobs.values())
            if reference_id is None or job.reference_id == reference_id
        ]

    def render(self, job: UpstreamJob) -> dict[str, Any]:
        """The LipsyncRequest object as Chamelaion sends it: absent fields are left out."""
        queued, processing = self.config.queued_seconds, self.config.processing_seconds
        status = job.pinned_status or self._natural_status(job)
        body: dict[str, Any] = {"id": job.id, "created_at": iso(job.created_at), "status": status}
        if job.reference_id is not None:
            body["reference_id"] = job.reference_id
        if status in _KNOWN_STATUSES[1:]:
            body["started_at"] = iso(job.created_at + timedelta(seconds=queued))
        if status in _KNOWN_STATUSES[2:]:
            body["finished_at"] = iso(job.created_at + timedelta(seconds=queued + processing))
        if status == "completed":
            body["output_url"] = OUTPUT_URL.format(id=job.id)
        elif status == "failed":
            body["error_message"] = FAILURE_MESSAGE
        body.update(job.overrides)
        for name in job.dropped:
            body.pop(name, None)
        return body

    def _natural_status(self, job: UpstreamJob) -> str:
        age = self._clock() - job.created_monotonic
        if age < self.config.queued_seconds:
            return "queued"
        if age < self.config.queued_seconds + self.config.processing_seconds:
            return "processing"
        return "failed" if job.fails else "completed"
