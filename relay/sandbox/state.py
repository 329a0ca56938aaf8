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
# Chamelaion's own examples write whole seconds; finer times make a list's order easier to read.
TimePrecision = Literal["seconds", "microseconds"]


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
    # How finely times (created_at, started_at, finished_at) are written.
    time_precision: TimePrecision = "seconds"
    # Seconds every /api call spends on the network: half before the sandbox reads it, half
    # after it answered (a cluster far from Chamelaion sees 0.1-0.2 s).
    latency: float = 0.0

    def __post_init__(self) -> None:
        if not self.api_keys or not all(self.api_keys):
            raise ValueError("SandboxConfig.api_keys needs at least one non-empty key")
        if self.queued_seconds < 0 or self.processing_seconds < 0:
            raise ValueError("SandboxConfig durations cannot be negative")
        if self.rate_limit_per_second is not None and self.rate_limit_per_second <= 0:
            raise ValueError("SandboxConfig.rate_limit_per_second must be positive or None")
        if self.list_max_limit is not None and self.list_max_limit < 1:
            raise ValueError("SandboxConfig.list_max_limit must be at least 1 or None")
        if self.history < 0 or self.processing_spread < 0 or self.latency < 0:
            raise ValueError("SandboxConfig history, spread and latency cannot be negative")


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


# What a malformed 200 answer carries instead of what was asked (relay.sandbox.malformed).
Malformed = Literal["html", "truncated", "wrong_types", "no_ids", "negative_total", "padding"]
MALFORMED_KINDS: tuple[Malformed, ...] = (
    "html",
    "truncated",
    "wrong_types",
    "no_ids",
    "negative_total",
    "padding",
)


@dataclass
class Fault:
    """Matching calls are delayed, answered with `status`, answered 200 with a `malformed` body,
    and/or preceded by a change to the list: `grow` new requests at its front (another client
    of the account submitting), `vanish` requests gone from its front (deleted).

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
    malformed: Malformed | None = None
    grow: int = 0
    vanish: int = 0

    def matches(self, key: str, group: str) -> bool:
        return self.paths in ("all", group, key)

    @property
    def label(self) -> str:
        """What it does to a call, as /_sandbox/stats counts it."""
        if self.status is not None:
            return str(self.status)
        if self.malformed is not None:
            return self.malformed
        if self.grow or self.vanish:
            return "grow" if self.grow else "vanish"
        return "delay"


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


def iso(moment: datetime, precision: TimePrecision = "seconds") -> str:
    if precision == "microseconds":
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
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
        self.made: set[str] = set()
        self.created_by_reference: dict[str, list[str]] = {}
        # route key -> what an injected fault did to its calls ("500", "429", "delay") -> count
        self.faults_fired: dict[str, Counter[str]] = {}
        # route key -> (when, what) for each fault that fired, the latest _TIMESTAMPS_KEPT
        self.faults_fired_at: dict[str, deque[tuple[float, str]]] = {}
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
            self.faults_fired.setdefault(key, Counter())[fault.label] += 1
            fired_at = self.faults_fired_at.setdefault(key, deque(maxlen=_TIMESTAMPS_KEPT))
            fired_at.append((self._clock(), fault.label))
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
        age: float = 0.0,
    ) -> UpstreamJob:
        """A new request, `age` seconds old (made earlier, by another client)."""
        job = UpstreamJob(
            id=str(uuid.uuid4()),
            created_at=datetime.now(UTC) - timedelta(seconds=age),
            created_monotonic=self._clock() - age,
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
        self.made.add(job.id)
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

    def grow(self, count: int) -> None:
        """Another client of the account submits `count` requests (they join the list's front)."""
        for _ in range(count):
            self.create_job(reference_id=None, fails=False)

    def vanish(self, count: int) -> None:
        """Delete the first `count` requests of the list (in its order) that no generate call
        here made: another client's rows, or old history under a retention policy."""
        gone = [job.id for job in self.listed(None) if job.id not in self.made][:count]
        for request_id in gone:
            del self.jobs[request_id]

    def finish_now(self, ids: list[str] | None) -> float:
        """Make these requests (default: every unfinished one a generate call made) finish at
        this instant, whatever their own durations said; returns the instant (sandbox clock)."""
        now = self._clock()
        chosen = ids if ids is not None else sorted(self.made)
        for request_id in chosen:
            job = self.jobs.get(request_id)
            if job is None:
                continue
            queued, processing = self.durations(job)
            if job.created_monotonic + queued + processing <= now:
                continue  # finished already
            age = now - job.created_monotonic
            job.durations = (min(queued, age), age - min(queued, age))
        return now

    def finishes(self) -> dict[str, float]:
        """When each request a generate call made finishes (or finished), on the sandbox clock."""
        out: dict[str, float] = {}
        for request_id in self.made:
            job = self.jobs.get(request_id)
            if job is not None:
                out[request_id] = job.created_monotonic + sum(self.durations(job))
        return out

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
        precision = self.config.time_precision
        body: dict[str, Any] = {
            "id": job.id,
            "created_at": iso(job.created_at, precision),
            "status": status,
        }
        if job.reference_id is not None:
            body["reference_id"] = job.reference_id
        if status in _KNOWN_STATUSES[1:]:
            body["started_at"] = iso(job.created_at + timedelta(seconds=queued), precision)
        if status in _KNOWN_STATUSES[2:]:
            finished = job.created_at + timedelta(seconds=queued + processing)
            body["finished_at"] = iso(finished, precision)
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
