"""Sweeps: learn many jobs' statuses from Chamelaion's list pages instead of one GET per job.

`GET /v1/lipsync/requests` returns whole LipsyncRequest objects, a page at a time. A sweep reads
only the window of that list which can hold the relay's outstanding jobs: from the newest row
back to the oldest outstanding job tracked within RELAY_SWEEP_WINDOW (`relay:created` dates
them). Every row that is an outstanding tracked job goes through the same path as a per-id poll
result (Poller.observe: same record_poll and end scripts, same callback); other rows are
ignored. A job seen is held back from per-id polls until after the next sweep should have seen
it again, so per-id polls are left to what sweeps do not cover: jobs older than the window, jobs
a sweep missed, and everything while sweeps fail.

Chamelaion documents neither the list's order nor its largest page, so both are read from what
comes back: the order from `created_at` (newest-first pages are read from offset 0 until a row
is older than the window; oldest-first ones from the window's start, found by bisection once
and remembered), the page size from the rows actually returned. A list in neither order, a
failing list or a 429 ends the sweep early; jobs then fall due for per-id polls, so nothing is
lost, and store.end.lua makes sure nothing ends twice.

One sweep runs at a time across all workers: whoever takes the lease (`relay:sweep:lease`, a
token SET NX with a TTL of RELAY_POLL_LEASE, renewed before every page) sweeps; a worker that
dies mid-sweep lets it expire. Every page spends one call of the shared upstream budget, booked
ahead of per-id polls, and a 429 pauses everyone as a poll's does.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import orjson
from redis.asyncio import Redis

from relay.errors import UpstreamError
from relay.jobs.poller import Poller
from relay.jobs.schedule import PollSchedule
from relay.jobs.store import Job, JobStore, PollRecord
from relay.lifecycle import Service, repeat
from relay.metrics import SWEEP_ORDER, SWEEP_PAGES, SWEEP_ROWS, SWEEPS
from relay.redis import keys, scripts
from relay.settings import Settings
from relay.upstream import Upstream, json_object, parse_retry_after

log = logging.getLogger(__name__)

NEWEST_FIRST = "newest_first"
OLDEST_FIRST = "oldest_first"
# Chamelaion's clock and Redis's may disagree, and created_at has whole seconds: the window
# reaches this much further back than the oldest outstanding job.
CLOCK_MARGIN = 5.0
# Page size assumed before any page told the real one.
GUESSED_PAGE = 100
# Failed sweeps back off up to this many seconds apart (each attempt costs an upstream call).
MAX_BACKOFF = 60.0
LIST_PATH = "v1/lipsync/requests"
# Seconds past the lease's expiry at which the workers try for the next sweep.
LEASE_SLACK = 0.005


class SweepEnded(Exception):
    """The sweep stops early; `outcome` names why (a label of relay_sweeps_total)."""

    def __init__(self, outcome: str, detail: str = "") -> None:
        super().__init__(outcome)
        self.outcome = outcome
        self.detail = detail


def created_time(value: object) -> float | None:
    """A row's created_at as epoch seconds; None when absent or not an ISO 8601 time."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment.timestamp() if moment.tzinfo is not None else None


def direction(times: Sequence[float | None]) -> str | None:
    """NEWEST_FIRST, OLDEST_FIRST, None (cannot tell: all equal) or "unusable" (neither)."""
    known = [t for t in times if t is not None]
    pairs = list(itertools.pairwise(known))
    rising = all(a <= b for a, b in pairs)
    falling = all(a >= b for a, b in pairs)
    if rising and falling:
        return None
    if rising:
        return OLDEST_FIRST
    return NEWEST_FIRST if falling else "unusable"


@dataclass(frozen=True)
class Page:
    offset: int
    times: list[float | None]
    size: int  # rows returned
    limit: int  # the page size Chamelaion says it applied
    total: int

    @property
    def end(self) -> int:
        return self.offset + self.size

    @property
    def first(self) -> float | None:
        return next((t for t in self.times if t is not None), None)

    @property
    def last(self) -> float | None:
        return next((t for t in reversed(self.times) if t is not None), None)


@dataclass
class Run:
    """One sweep in progress."""

    token: str
    start: float  # rows created before this (epoch seconds) are outside the window
    hold: float
    pages: int = 0
    page_size: int = 0  # the largest page seen
    matched: int = 0
    # The last page's rows being handled while the next page is fetched.
    handling: asyncio.Task[None] | None = None

    async def handled(self) -> None:
        """Wait until the rows read so far are handled."""
        if self.handling is not None:
            task, self.handling = self.handling, None
            await task


class Sweeper(Service):
    name = "sweeper"

    def __init__(
        self,
        *,
        redis: Redis,
        store: JobStore,
        schedule: PollSchedule,
        poller: Poller,
        upstream: Upstream,
        settings: Settings,
    ) -> None:
        self.redis = redis
        self.store = store
        self.schedule = schedule
        self.poller = poller
        self.upstream = upstream
        self.settings = settings
        self.lease = settings.poll_lease
        self._window = scripts.register(redis, __name__, "window")
        self._lease = scripts.register(redis, __name__, "lease")
        self._stopping = asyncio.Event()

    # -- the loop every worker runs --------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Take the sweep whenever it is free and due, until `stop`."""
        self._stopping = stop  # a sweep in progress stops before its next page
        await repeat(
            self._turn, every=min(self.settings.sweep_interval, 0.5), stop=stop, what="sweep"
        )

    async def _turn(self) -> float | None:
        await self.sweep_once()
        # The lease is held until the next sweep is due (see _finish): waking just as it frees
        # keeps sweeps sweep_interval apart, so an end is seen within about one interval, not
        # up to half an idle tick later. At most an interval: a sweep in progress elsewhere
        # renews its lease, then shortens it when done.
        frees_in: int = await self.redis.pttl(keys.SWEEP_LEASE)
        if frees_in > 0:
            return min(frees_in / 1000, self.settings.sweep_interval) + LEASE_SLACK
        return None

    async def sweep_once(self) -> str | None:
        """Run one sweep if this worker gets the lease; its outcome, or None if not run."""
        token = f"{os.getpid()}:{uuid.uuid4().hex}"
        ttl = math.ceil(self.lease * 1000)
        if not await self.redis.set(keys.SWEEP_LEASE, token, nx=True, px=ttl):
            return None
        started = time.monotonic()
        outcome = "complete"
        try:
            outcome = await self._sweep(token)
        except SweepEnded as ended:
            outcome = ended.outcome
            level = logging.INFO if outcome in ("stopped", "lost_lease") else logging.WARNING
            log.log(
                level,
                "sweep ended early; jobs it did not see fall back to per-id polls",
                extra={"outcome": outcome, "detail": ended.detail},
            )
        finally:
            elapsed = time.monotonic() - started
            await self._finish(token, outcome, elapsed)
        return outcome

    async def _finish(self, token: str, outcome: str, elapsed: float) -> None:
        failures = 0
        if outcome not in ("complete", "idle", "stopped", "lost_lease"):
            [failures] = await self._state_call("hincrby", keys.SWEEP_STATE, "failures", 1)
        elif outcome == "complete":
            await self._remember(failures=0, duration=f"{elapsed:.3f}")
        if outcome != "idle":
            SWEEPS.labels(outcome).inc()
        # Sweeps start sweep_interval apart (start to start); failing ones back off.
        spacing = min(self.settings.sweep_interval * 2**failures, MAX_BACKOFF)
        keep = spacing - elapsed if failures == 0 else spacing
        await self._lease(keys=[keys.SWEEP_LEASE], args=[token, max(0, math.ceil(keep * 1000))])

    async def _state_call(self, command: str, *args: Any) -> list[Any]:
        """One Redis command through a pipeline (typed the same whatever the command)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            getattr(pipe, command)(*args)
            return await pipe.execute()

    async def _remember(self, **fields: str | int) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(keys.SWEEP_STATE, mapping=fields)
            await pipe.execute()

    # -- one sweep -------------------------------------------------------------------------

    async def _sweep(self, token: str) -> str:
        outstanding, oldest, _now = await self._window(
            keys=[keys.CREATED, keys.POLLS],
            args=[self.settings.sweep_window, self.settings.max_job_age],
        )
        if not oldest:
            return "idle"  # nothing outstanding within the window: no call at all
        [raw] = await self._state_call("hgetall", keys.SWEEP_STATE)
        state = {k.decode(): v.decode() for k, v in raw.items()}
        page_size = int(state.get("page_size") or GUESSED_PAGE)
        duration = float(state.get("duration") or 0)
        # The next sweep should take about as long as the last, or as long as the pages this
        # many jobs need at half the budget's pace (per-id polls take the rest while sweeps have
        # not seen every job); a job seen now is held past two of them. Held too briefly, jobs
        # fall back to per-id polls, which slow the sweep further.
        pages = int(outstanding) / page_size + 2
        expected = max(duration, 2 * pages * self.schedule.period)
        hold = 2 * max(expected, self.settings.sweep_interval) + self.settings.poll_min_interval
        run = Run(token=token, start=float(oldest) - CLOCK_MARGIN, hold=hold)
        try:
            try:
                order = await self._read(run, state.get("order"), state.get("cursor"))
            finally:
                await run.handled()  # every row read is handled, whatever ended the sweep
        except SweepEnded as ended:
            if ended.outcome == "unusable_order":
                SWEEP_ORDER.labels("unusable").inc()
                await self._state_call("hdel", keys.SWEEP_STATE, "order", "cursor")
            raise
        finally:
            if run.page_size:
                await self._remember(page_size=run.page_size)
        SWEEP_ORDER.labels(order or "unknown").inc()
        log.debug(
            "sweep complete",
            extra={"pages": run.pages, "matched": run.matched, "order": order},
        )
        return "complete"

    async def _read(self, run: Run, known: str | None, cursor: str | None) -> str | None:
        if known == OLDEST_FIRST and cursor is not None:
            page = await self._page(run, int(cursor))
            moved = page.size == 0 or (page.first is not None and page.first >= run.start)
            if page.offset > 0 and moved:
                # The window now starts before the remembered place (or the list shrank under
                # it): find it again.
                page = await self._locate(run, 0, min(page.offset, page.total))
            return await self._forward(run, page, OLDEST_FIRST)
        page = await self._page(run, 0)
        # None: one page of rows from a single second, whose order cannot be told yet.
        return await self._forward(run, page, direction(page.times))

    async def _forward(self, run: Run, page: Page, order: str | None) -> str | None:
        """Read on from `page` to the window's end, checking that the order holds throughout."""
        previous: float | None = None
        cursor: int | None = None
        while True:
            seen = direction([previous, *page.times])
            if seen == "unusable" or (order is not None and seen not in (None, order)):
                raise SweepEnded("unusable_order", "the list is neither newest nor oldest first")
            order = order or seen
            previous = page.last if page.last is not None else previous
            if order == OLDEST_FIRST and cursor is None:
                if page.end < page.total and page.last is not None and page.last < run.start:
                    page = await self._locate(run, page.end, page.total)
                    previous = None
                    continue
                first_in_window = next(
                    (
                        page.offset + i
                        for i, t in enumerate(page.times)
                        if t is None or t >= run.start
                    ),
                    None,
                )
                # Remembered one row early: the next sweep's first row is then older than the
                # window unless the window now starts earlier, which `_read` checks for.
                cursor = None if first_in_window is None else max(0, first_in_window - 1)
            if order == NEWEST_FIRST and page.last is not None and page.last < run.start:
                break  # every row further on is older than the window
            if page.size == 0 or page.size < page.limit or page.end >= page.total:
                break
            page = await self._page(run, page.end)
        if order is not None:
            await self._remember(order=order)
        if order == OLDEST_FIRST:
            where = cursor if cursor is not None else page.end
            await self._remember(cursor=where)
        return order

    async def _locate(self, run: Run, low: int, high: int) -> Page:
        """Bisect an oldest-first list for the page where the window starts.

        Rows before `low` are older than the window; rows from `high` on are not.
        """
        size = max(run.page_size, 1)
        while high - low > size:
            page = await self._page(run, (low + high) // 2)
            size = max(run.page_size, 1)
            if page.size == 0:
                high = page.offset
            elif page.last is not None and page.last < run.start:
                low = page.end
            elif page.first is None or page.first >= run.start:
                high = page.offset
            else:
                return page  # it straddles the window's start
        return await self._page(run, low)

    async def _page(self, run: Run, offset: int) -> Page:
        """Read one page within the budget and the lease, and handle its tracked rows."""
        if self._stopping.is_set():
            raise SweepEnded("stopped")
        await self._take_budget()
        if not await self._lease(
            keys=[keys.SWEEP_LEASE], args=[run.token, math.ceil(self.lease * 1000)]
        ):
            raise SweepEnded("lost_lease", "another worker holds the sweep lease")
        # Bounded well inside the lease, so no second sweep can start while this call runs.
        timeout = min(self.settings.upstream_timeout, self.lease / 2)
        try:
            response = await self.upstream.request(
                "GET",
                LIST_PATH,
                params={"limit": str(self.settings.sweep_page_size), "offset": str(offset)},
                timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            )
        except UpstreamError as exc:
            raise SweepEnded("unreachable", exc.message) from exc
        if response.status_code == 429:
            pause = await self.schedule.pause_for_429(
                parse_retry_after(response.headers), met_by="a sweep"
            )
            raise SweepEnded("rate_limited", f"429 for {pause} s")
        if response.status_code != 200:
            raise SweepEnded("error", f"HTTP {response.status_code}")
        body = json_object(response.content)
        rows, limit, total = _rows(body)
        if rows is None or limit is None or total is None:
            raise SweepEnded("bad_body", "the list answer is not a page of requests")
        SWEEP_PAGES.inc()
        run.pages += 1
        run.page_size = max(run.page_size, len(rows))
        await run.handled()
        run.handling = asyncio.create_task(self._handle(run, rows))
        return Page(
            offset=offset,
            times=[created_time(row.get("created_at")) for row in rows],
            size=len(rows),
            limit=limit,
            total=total,
        )

    async def _take_budget(self) -> None:
        while True:
            booked, wait = await self.schedule.reserve()
            if wait > 0:
                await asyncio.sleep(wait)
            if booked:
                return
            if self._stopping.is_set():
                raise SweepEnded("stopped")

    async def _handle(self, run: Run, rows: list[dict[str, Any]]) -> None:
        """Hand every row that is an outstanding tracked job to the poller; ignore the rest."""
        ids = [row["id"] for row in rows if isinstance(row.get("id"), str) and row["id"]]
        if not ids:
            return
        [scores] = await self._state_call("zmscore", keys.POLLS, ids)
        matched = {rid for rid, score in zip(ids, scores, strict=True) if score is not None}
        if not matched:
            return
        by_id = {row["id"]: row for row in rows if row.get("id") in matched}
        jobs = await self.store.get_many(list(by_id))
        run.matched += len(by_id)
        SWEEP_ROWS.inc(len(by_id))
        # Rows that only move a job along are stored in one round trip; rows that end a job
        # (or a job to wrap up) take the poller's whole path, one by one.
        records: list[PollRecord] = []
        slow: list[tuple[Job, bytes]] = []
        for job in jobs:
            if job is None:
                continue
            raw = orjson.dumps(by_id[job.request_id])
            record = None
            if not self.poller.needs_wrap_up(job):
                record = self.poller.plan(job, raw, hold=run.hold)
            if record is None:
                slow.append((job, raw))
            else:
                records.append(record)
        if records:
            await self.store.record_polls(records)
        await asyncio.gather(*(self._observe(run, job, raw) for job, raw in slow))

    async def _observe(self, run: Run, job: Job, raw: bytes) -> None:
        if await self.poller.wrap_up(job):
            return
        await self.poller.observe(job, raw, hold=run.hold)


def _rows(
    body: dict[str, Any] | None,
) -> tuple[list[dict[str, Any]] | None, int | None, int | None]:
    """A list answer's rows, applied limit and total; Nones when it is not such a page."""
    if body is None or not isinstance(body.get("data"), list):
        return None, None, None
    pagination = body.get("pagination")
    numbers: list[Any] = [
        pagination.get(name) if isinstance(pagination, dict) else None
        for name in ("limit", "total")
    ]
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers):
        return None, None, None
    rows = [row for row in body["data"] if isinstance(row, dict)]
    # Trust what came back over what was asked: a limit of 0 or one below the rows returned
    # would end the read early, so the page's own size is the floor.
    return rows, max(int(numbers[0]), len(rows), 1), int(numbers[1])
