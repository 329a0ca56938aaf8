"""The sandbox upstream's memory: its settings, jobs, injected faults, rate limit and call log.

Everything lives in one `SandboxState` per app instance, touched only from the event loop that
serves it, so it needs no locks. A job's status is worked out from its age each time it is read
(queued, then processing, then completed or failed), so there is no background task to run.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

FAILURE_MESSAGE = "video URL is not accessible"
OUTPUT_URL = "https://storage.chamelaion.example/output/{id}.mp4"
_KNOWN_STATUSES = ("queued", "processing", "completed", "failed")
_TIMESTAMPS_KEPT = 10_000  # per route: enough for any rate check, bounded for a long `relay dev`
# History rows are spread over this span before the sandbox started, oldest first.
_HISTORY_SPAN = timedelta(days=90)

ListOrder = Literal["newest_first", "oldest_first", "shuffled"]


@dataclass(frozen=True)
class SandboxConfig:
    api_keys: tuple[str, ...] = ("sandbox-key",)
    queued_seconds: float = 1.0
    processing_seconds: float = 2.0
    rate_limit_per_second: float | None = None
    # Chamelaion does not document its list order or its largest page: both are knobs here.
    list_order: ListOrder = "newest_first"
    list_max_limit: int | None = None
    # Finished requests the account held before the sandbox started (other systems' jobs).
    history: int = 0
    # Each job's processing takes processing_seconds plus up to this much more (fixed per id).
    processing_spread: float = 0.0
    # Seeds the draws of faults given a `rate` (None: a fresh seed), so a run can be replayed.
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.api_keys or not all(self.api_keys):
            raise ValueError("SandboxConfig.api_keys needs at least one non-empty key")
        if self.queued_seconds < 0 or self.processing_seconds < 0:
            raise ValueError("SandboxConfig durations cannot be negative")
        if self.rate_limit_per_second is not None and self.rate_limit_per_second <= 0:
            raise ValueError("SandboxConfig.rate_limit_per_second must be positive or None")
        if self.list_max_limit is not None and self.list_max_limit < 1:
            raise ValueError("SandboxConfig.list_max_limit must be at least 1 or None")
        if self.history < 0 or self.processing_spread < 0:
            raise ValueError("SandboxConfig.history and processing_spread cannot be negative")


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
    # (queued, processing) seconds for this job; None: the config's.
    durations: tuple[float, float] | None = None


@dataclass
class Fault:
    """Matching calls are delayed and/or answered with `status`.

    Without a `rate`, the next `remaining` matching calls are hit. With one, each matching call
    is hit with that probability, `remaining` times at most (None: for as long as the fault is
    set).
    """

    status: int | None
    remaining: int | None
    paths: str  # "poll", "generate", "all", or one route key such as "GET /health"
    retry_after: float | None = None
    delay: float = 0.0
    after_handling: bool = False  # handle the call (create the job), then answer the error
    error: str | None = None
    rate: float | None = None

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
        self.in_flight: Counter[str] = Counter()
        self.peak_in_flight: Counter[str] = Counter()
        # Jobs made by the generate endpoints (not history, not /_sandbox/requests): what a
        # test counts to find a submission that became two upstream jobs.
        self.created = 0
        self.created_by_reference: dict[str, list[str]] = {}
        # route key -> what an injected fault did to its calls ("500", "429", "delay") -> count
        self.faults_fired: dict[str, Counter[str]] = {}
        self._random = random.Random(self.config.seed)  # noqa: S311 - test faults, not secrets
        self._add_history(self.config.history)
        rate = self.config.rate_limit_per_second
        self._bucket = TokenBucket(rate, self._clock) if rate is not None else None

    def _add_history(self, count: int) -> None:
        started = datetime.now(UTC)
        for position in range(count):
            created = started - _HISTORY_SPAN * (1 - position / count)
            job = UpstreamJob(
                id=str(uuid.uuid4()),
                created_at=created,
                created_monotonic=self._clock() - (started - created).total_seconds(),
                reference_id=f"history-{position}",
                fails=position % 10 == 0,
            )
            self.jobs[job.id] = job

    def enter(self, key: str) -> None:
        self.in_flight[key] += 1
        self.peak_in_flight[key] = max(self.peak_in_flight[key], self.in_flight[key])

    def leave(self, key: str) -> None:
        self.in_flight[key] -= 1

    def record_call(self, key: str) -> None:
        self.calls[key] += 1
        self.timestamps.setdefault(key, deque(maxlen=_TIMESTAMPS_KEPT)).append(self._clock())

    def take_fault(self, key: str, group: str) -> Fault | None:
        """The fault that hits this call, if any, trying matching faults in the order they were
        set: a counted fault hits it; a rate fault hits it with its probability.

        Rate faults share one draw per call, each taking its own slice of it, so faults of
        rate 0.1 and 0.05 on the same calls hit 10 % and 5 % of them, never the same call.
        """
        draw: float | None = None
        share = 0.0
        for fault in self.faults:
            if not fault.matches(key, group):
                continue
            if fault.rate is not None:
                draw = self._random.random() if draw is None else draw
                share += fault.rate
                if draw >= share:
                    continue
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self.faults.remove(fault)
            fired = str(fault.status) if fault.status is not None else "delay"
            self.faults_fired.setdefault(key, Counter())[fired] += 1
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
        durations: tuple[float, float] | None = None,
    ) -> UpstreamJob:
        job = UpstreamJob(
            id=str(uuid.uuid4()),
            created_at=datetime.now(UTC),
            created_monotonic=self._clock(),
            reference_id=reference_id,
            fails=fails,
            json_body=json_body,
            uploads=uploads,
            durations=durations,
        )
        self.jobs[job.id] = job
        return job

    def count_created(self, job: UpstreamJob) -> None:
        """Count a job a generate endpoint made (what Chamelaion would bill)."""
        self.created += 1
        if job.reference_id is not None:
            self.created_by_reference.setdefault(job.reference_id, []).append(job.id)

    def find(self, id_or_reference: str) -> UpstreamJob | None:
        """By request id, else the newest job with that reference_id, like Chamelaion."""
        if id_or_reference in self.jobs:
            return self.jobs[id_or_reference]
        for job in reversed(self.jobs.values()):
            if job.reference_id == id_or_reference:
                return job
        return None

    def listed(self, reference_id: str | None) -> list[UpstreamJob]:
        """The jobs in the configured list order (newest first, as Chamelaion's example reads)."""
        order = self.config.list_order
        jobs = (
            list(self.jobs.values())
            if order == "oldest_first"
            else list(reversed(self.jobs.values()))
        )
        if reference_id is not None:
            jobs = [job for job in jobs if job.reference_id == reference_id]
        if order == "shuffled":
            random.shuffle(jobs)
        return jobs

    def durations(self, job: UpstreamJob) -> tuple[float, float]:
        if job.durations is not None:
            return job.durations
        queued, processing = self.config.queued_seconds, self.config.processing_seconds
        if self.config.processing_spread:
            share = hashlib.sha256(job.id.encode()).digest()[0] / 255
            processing += share * self.config.processing_spread
        return queued, processing

    def render(self, job: UpstreamJob) -> dict[str, Any]:
        """The LipsyncRequest object as Chamelaion sends it: absent fields are left out."""
        queued, processing = self.durations(job)
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
        queued, processing = self.durations(job)
        if age < queued:
            return "queued"
        if age < queued + processing:
            return "processing"
        return "failed" if job.fails else "completed"
