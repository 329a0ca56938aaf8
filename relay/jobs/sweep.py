"""Sweeps: learn many jobs' statuses from Chamelaion's list pages instead of one GET per job.

`GET /v1/lipsync/requests` returns whole LipsyncRequest objects, a page at a time. A sweep reads
only the window of that list which can hold the relay's outstanding jobs: from the newest row
back to the oldest outstanding job tracked within RELAY_SWEEP_WINDOW (`relay:created` dates
them). Every row that is an outstanding tracked job goes through the same path as a per-id poll
result (Poller.observe: same record_poll and end scripts, same callback); other rows are
ignored. A job seen is held back from per-id polls until after the next sweep should have seen
it again, so per-id polls are left to what sweeps do not cover: jobs older than the window, jobs
a sweep missed, and everything while sweeps fail.

The list is live: requests are created (and some deleted) while a sweep reads it, and an offset
is a position at the moment of each read. So rows are known by `id`, never by position: a row
pushed on a page by newer ones is seen twice and handled once; one that moved back past a page
already read is left to the next sweep or a per-id poll; store.end.lua makes sure nothing ends
twice.

Chamelaion documents neither the list's order nor its largest page, so both are read from what
comes back. The order is the one the bulk of neighbouring rows within pages agree on (a page is
one moment's snapshot; where two pages join, the list may have moved between the reads, and
whole-second `created_at` ties say nothing), remembered for sweeps whose pages cannot tell. A
newest-first list is read from offset 0 until a row is older than the window or every job
tracked in the window was seen; an oldest-first one from the window's start (found by bisection
once and remembered) to the end. Once a page has told the total and the page size, the rest are
read several at once (RELAY_SWEEP_CONCURRENCY in flight), each as soon as the budget gives it a
slot: a sweep of N pages costs N slots and about one page's latency, not N latencies.

A list in no usable order, a failing first page or a 429 ends the sweep early; a later page that
fails or makes no sense is skipped (its rows wait for the next sweep), unless several in a row
are. Jobs a sweep did not see fall due for per-id polls, so nothing is lost.

One sweep runs at a time across all workers: whoever takes the lease (`relay:sweep:lease`, a
token SET NX with a TTL of RELAY_POLL_LEASE, renewed before every page) sweeps; a worker that
dies mid-sweep lets it expire. Every page spends one call of the upstream budget, from the
status reads' own share when that comes first (relay.jobs.schedule), booked ahead of per-id
polls, and a 429 pauses everyone as a poll's does.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import orjson
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind
from redis.asyncio import Redis

from relay.errors import UpstreamError
from relay.jobs.poller import Poller
from relay.jobs.schedule import PollSchedule
from relay.jobs.store import Job, JobStore, PollRecord
from relay.lifecycle import Service, repeat
from relay.metrics import (
    SWEEP_ORDER,
    SWEEP_PAGE_WAIT,
    SWEEP_PAGES,
    SWEEP_PAGES_SKIPPED,
    SWEEP_ROWS,
    SWEEPS,
)
from relay.redis import keys, scripts
from relay.redis.batch import batcher
from relay.settings import Settings
from relay.tracing import setup, spans
from relay.upstream import AnswerTooLarge, Upstream, json_object, parse_retry_after

log = logging.getLogger(__name__)

NEWEST_FIRST = "newest_first"
OLDEST_FIRST = "oldest_first"
UNUSABLE = "unusable"
# Chamelaion's clock and Redis's may disagree, and created_at has whole seconds: the window
# reaches this much further back than the oldest outstanding job until sweeps have measured how
# far created_at runs behind the time the relay tracked each job (`lag`); then it reaches back
# that far (rounded up), a second more, and at most MAX_MARGIN.
CLOCK_MARGIN = 5.0
MAX_MARGIN = 600.0
# Page size assumed before any page told the real one.
GUESSED_PAGE = 100
# Failed sweeps back off up to this many seconds apart (each attempt costs an upstream call).
MAX_BACKOFF = 60.0
LIST_PATH = "v1/lipsync/requests"
# Seconds past the lease's expiry at which the workers try for the next sweep.
LEASE_SLACK = 0.005
# The share of neighbouring rows (of those not tied) that must go one way for the list to be
# read as in that order; fewer untied pairs than ORDER_EVIDENCE that disagree only say "not
# yet" (a few rows with odd times), more say the list has no usable order.
ORDER_MAJORITY = 0.9
ORDER_EVIDENCE = 8
# Pages that fail in a row (after the first) before a sweep gives up on the list.
FAILED_PAGES = 3
# Outcomes of one page that skip it rather than end the sweep (after the first page).
SKIPPABLE = ("error", "unreachable", "bad_body")
# Outcomes that leave the list's health as it was: no back-off follows them.
UNHURT = ("complete", "partial", "idle", "stopped", "lost_lease")


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


@dataclass
class Tally:
    """Neighbouring rows within pages, counted by which way their created_at goes."""

    rising: int = 0
    falling: int = 0

    def add(self, times: Sequence[float | None]) -> None:
        known = [t for t in times if t is not None]
        for earlier, later in itertools.pairwise(known):
            if later > earlier:
                self.rising += 1
            elif later < earlier:
                self.falling += 1

    def order(self) -> str | None:
        """NEWEST_FIRST, OLDEST_FIRST, None (too little to tell) or UNUSABLE (no order)."""
        untied = self.rising + self.falling
        if untied == 0:
            return None
        if max(self.rising, self.falling) >= ORDER_MAJORITY * untied:
            return OLDEST_FIRST if self.rising > self.falling else NEWEST_FIRST
        return UNUSABLE if untied >= ORDER_EVIDENCE else None


@dataclass(frozen=True)
class Page:
    offset: int
    times: list[float | None]
    size: int  # entries returned: the next page starts this far on
    limit: int  # the page size Chamelaion says it applied
    total: int

    @property
    def end(self) -> int:
        return self.offset + self.size

    @property
    def last_of_list(self) -> bool:
        return self.size == 0 or self.size < self.limit or self.end >= self.total

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
    oldest: float  # when the oldest outstanding job in the window was tracked (Redis time)
    start: float  # rows created before this (epoch seconds) are outside the window
    hold: float
    window_at: float  # Redis time when the window was read
    window: float  # RELAY_SWEEP_WINDOW
    expected: int  # jobs tracked within the window then: once all are seen, all are
    page_size: int  # the page size the last sweeps saw
    step: int | None = None  # the page size this sweep saw: offsets of pages read at once
    pages: int = 0
    matched: int = 0
    skipped: int = 0
    total: int = 0  # the largest total any page told
    expected_seen: int = 0
    # How far created_at ran behind the time the relay tracked the job, at most (seconds).
    lag: float | None = None
    tally: Tally = field(default_factory=Tally)
    seen: set[str] = field(default_factory=set)
    # Pages' rows being handled while more pages are read.
    handling: set[asyncio.Task[None]] = field(default_factory=set)

    async def handled(self) -> None:
        """Wait for the rows handed over so far."""
        while self.handling:
            tasks, self.handling = self.handling, set()
            await asyncio.gather(*tasks)


@dataclass
class PageSpan:
    """A sweep page's span, ended (so exported) only once it is known to have moved a job."""

    span: Span
    fetched: int  # when the page's answer was in (ns): the span's end
    links: int = 0

    def moved(self, jobs: Iterable[Job]) -> None:
        for job in jobs:
            context = spans.link_to(job.trace)
            if context is not None:
                self.span.add_link(context, {"relay.job.id": job.request_id})
                self.links += 1

    def close(self) -> None:
        if self.links:
            self.span.set_attribute("relay.sweep.jobs_moved", self.links)
            self.span.end(end_time=self.fetched)


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
        outcome = await self.sweep_once()
        # The lease is held until the next sweep is due (see _finish): waking just as it frees
        # keeps sweeps sweep_interval apart, so an end is seen within about one interval, not
        # up to half an idle tick later. At most an interval: a sweep in progress elsewhere
        # renews its lease, then shortens it when done.
        frees_in: int = (await batcher(self.redis).run([("PTTL", keys.SWEEP_LEASE)]))[0]
        if frees_in > 0:
            return min(frees_in / 1000, self.settings.sweep_interval) + LEASE_SLACK
        if outcome is not None:
            # This sweep took longer than the interval and dropped the lease: the next one is
            # due now. An idle tick here delayed every end it would see by as much.
            return 0.0
        return None

    async def sweep_once(self) -> str | None:
        """Run one sweep if this worker gets the lease; its outcome, or None if not run."""
        token = f"{os.getpid()}:{uuid.uuid4().hex}"
        ttl = math.ceil(self.lease * 1000)
        [taken] = await batcher(self.redis).run([("SET", keys.SWEEP_LEASE, token, "NX", "PX", ttl)])
        if not taken:
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
        if outcome not in UNHURT:
            [failures] = await batcher(self.redis).run(
                [("HINCRBY", keys.SWEEP_STATE, "failures", 1)]
            )
        elif outcome in ("complete", "partial"):
            await self._remember(failures=0, duration=f"{elapsed:.3f}")
        if outcome != "idle":
            SWEEPS.labels(outcome).inc()
        # Sweeps start sweep_interval apart (start to start); failing ones back off.
        spacing = min(self.settings.sweep_interval * 2**failures, MAX_BACKOFF)
        keep = spacing - elapsed if failures == 0 else spacing
        await self._lease(keys=[keys.SWEEP_LEASE], args=[token, max(0, math.ceil(keep * 1000))])

    async def _remember(self, **fields: str | int) -> None:
        pairs = [part for field in fields.items() for part in field]
        await batcher(self.redis).run([("HSET", keys.SWEEP_STATE, *pairs)])

    # -- one sweep -------------------------------------------------------------------------

    async def _sweep(self, token: str) -> str:
        outstanding, oldest, now, in_window = await self._window(
            keys=[keys.CREATED, keys.POLLS],
            args=[self.settings.sweep_window, self.settings.max_job_age],
        )
        if not oldest:
            return "idle"  # nothing outstanding within the window: no call at all
        [raw] = await batcher(self.redis).run([("HGETALL", keys.SWEEP_STATE)])
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
        lag = state.get("lag")
        margin = CLOCK_MARGIN if lag is None else min(math.ceil(float(lag)) + 1.0, MAX_MARGIN)
        run = Run(
            token=token,
            oldest=float(oldest),
            start=float(oldest) - margin,
            hold=hold,
            window_at=float(now),
            window=self.settings.sweep_window,
            expected=int(in_window),
            page_size=page_size,
        )
        try:
            try:
                order = await self._read(run, state.get("order"), state.get("cursor"))
            finally:
                await run.handled()  # every row read is handled, whatever ended the sweep
        except SweepEnded as ended:
            if ended.outcome == "unusable_order":
                SWEEP_ORDER.labels(UNUSABLE).inc()
                await batcher(self.redis).run([("HDEL", keys.SWEEP_STATE, "order", "cursor")])
            raise
        finally:
            learned: dict[str, str | int] = {}
            if run.step:
                learned["page_size"] = run.step
            if run.lag is not None:
                learned["lag"] = f"{max(run.lag, 0.0):.3f}"
            if learned:
                await self._remember(**learned)
        SWEEP_ORDER.labels(order or "unknown").inc()
        log.debug(
            "sweep complete",
            extra={
                "pages": run.pages,
                "matched": run.matched,
                "order": order,
                "skipped": run.skipped,
            },
        )
        return "partial" if run.skipped else "complete"

    def _order(self, run: Run, known: str | None) -> str | None:
        """The list's order as the pages read so far tell it, else `known` (what earlier sweeps
        found); SweepEnded when the pages show no usable order."""
        seen = run.tally.order()
        if seen == UNUSABLE:
            raise SweepEnded("unusable_order", "the list is neither newest nor oldest first")
        return seen or known

    async def _read(self, run: Run, known: str | None, cursor: str | None) -> str | None:
        if known == OLDEST_FIRST and cursor is not None:
            page = await self._page(run, int(cursor))
            if self._order(run, known) == OLDEST_FIRST:
                moved = page.size == 0 or (page.first is not None and page.first >= run.start)
                if page.offset > 0 and moved:
                    # The window now starts before the remembered place (or the list shrank
                    # under it): a page back, most often; else find it again.
                    back = await self._page(run, max(0, page.offset - (run.step or run.page_size)))
                    straddles = back.first is not None and back.first < run.start
                    page = back if straddles else await self._locate(run, 0, back.offset)
                await self._oldest_first(run, page)
                return OLDEST_FIRST
            # The rows there now run newest first: read the list from the top.
        page = await self._page(run, 0)
        order = self._order(run, known)
        while order is None and not page.last_of_list:
            # Rows of one second so far, and no order known: read on until they tell.
            page = await self._page(run, page.end)
            order = self._order(run, None)
        if order == OLDEST_FIRST:
            if not page.last_of_list and page.last is not None and page.last < run.start:
                page = await self._locate(run, page.end, page.total)
            await self._oldest_first(run, page)
        elif order == NEWEST_FIRST:
            await self._newest_first(run, page)
        return order

    async def _newest_first(self, run: Run, page: Page) -> None:
        """Read on from `page` (read already) to the window's end."""

        def done(page: Page) -> bool:
            self._keeps(run, NEWEST_FIRST)
            return (
                page.last_of_list
                or (page.last is not None and page.last < run.start)
                or 0 < run.expected <= run.expected_seen
            )

        if not done(page):
            await self._pages(run, page.end, stop=done)
        await self._remember(order=NEWEST_FIRST)

    async def _oldest_first(self, run: Run, page: Page) -> None:
        """Read on from `page`, where the window starts, to the end of the list."""
        first_in_window = next(
            (page.offset + i for i, t in enumerate(page.times) if t is None or t >= run.start),
            None,
        )

        def done(page: Page) -> bool:
            self._keeps(run, OLDEST_FIRST)
            # The end as this page saw it: rows added since are the next sweep's.
            return page.last_of_list

        if not page.last_of_list:
            await self._pages(run, page.end, stop=done)
        # Remembered one row early: the next sweep's first row is then older than the window
        # unless the window now starts earlier, which `_read` checks for.
        cursor = page.end if first_in_window is None else max(0, first_in_window - 1)
        await self._remember(order=OLDEST_FIRST, cursor=cursor)

    def _keeps(self, run: Run, order: str) -> None:
        """The pages read so far still run in `order` (else SweepEnded)."""
        if self._order(run, order) != order:
            raise SweepEnded("unusable_order", f"the list stopped being {order} mid-sweep")

    async def _locate(self, run: Run, low: int, high: int) -> Page:
        """Bisect an oldest-first list for the page where the window starts.

        Rows before `low` are older than the window; rows from `high` on are not.
        """
        size = max(run.step or run.page_size, 1)
        while high - low > size:
            page = await self._page(run, (low + high) // 2)
            size = max(run.step or run.page_size, 1)
            if page.size == 0:
                high = page.offset
            elif page.last is not None and page.last < run.start:
                low = page.end
            elif page.first is None or page.first >= run.start:
                high = page.offset
            else:
                return page  # it straddles the window's start
        return await self._page(run, low)

    async def _pages(
        self,
        run: Run,
        offset: int,
        *,
        stop: Callable[[Page], bool],
    ) -> None:
        """Read the pages from `offset` on, several at once: each as soon as the budget gives it
        a slot, at most RELAY_SWEEP_CONCURRENCY in flight, up to the end of the list as the
        pages tell it or until `stop` says a page read was the last needed.

        Pages in flight when one ends the sweep (a 429) are still awaited and their rows used.
        """
        step = max(run.step or run.page_size, 1)
        fetches: set[asyncio.Task[Page]] = set()
        booking: asyncio.Task[None] | None = None
        gaps: list[int] = []  # offsets a short page left unread
        ended: SweepEnded | None = None
        enough = False  # a page said no more are needed
        failed = 0  # pages that failed in a row
        try:
            while True:
                if booking is not None and (enough or ended is not None):
                    booking.cancel()  # the slot goes unused
                    await asyncio.gather(booking, return_exceptions=True)
                    booking = None
                more = gaps or offset < run.total
                room = len(fetches) < self.settings.sweep_concurrency
                if booking is None and more and room and not enough and ended is None:
                    booking = asyncio.create_task(self._take_budget())
                waiting: set[asyncio.Task[Any]] = set(fetches)
                if booking is not None:
                    waiting.add(booking)
                if not waiting:
                    break
                finished, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                # Pages first: one that ends the sweep (a 429) must stop the next page going out.
                for task in finished - {booking}:
                    fetches.discard(task)
                    try:
                        page = task.result()
                        enough = stop(page) or enough
                    except SweepEnded as exc:
                        if exc.outcome in SKIPPABLE and failed + 1 < FAILED_PAGES:
                            failed += 1
                            run.skipped += 1
                            SWEEP_PAGES_SKIPPED.labels(exc.outcome).inc()
                        else:
                            ended = ended or exc
                        continue
                    failed = 0
                    if page.size < step and not page.last_of_list:
                        gaps.append(page.end)  # a short page: read what it left out
                if booking is not None and booking in finished:
                    slot, booking = booking, None
                    slot.result()  # raises SweepEnded("stopped") when the worker stops
                    if not enough and ended is None:
                        if gaps:
                            at = gaps.pop()
                        else:
                            at, offset = offset, offset + step
                        fetches.add(asyncio.create_task(self._fetch(run, at)))
        finally:
            leftovers = [*fetches, *([booking] if booking is not None else [])]
            for task in leftovers:
                task.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)
        if ended is not None:
            raise ended

    async def _page(self, run: Run, offset: int) -> Page:
        """Read one page within the budget (one at a time: while the list's shape is unknown)."""
        await self._take_budget()
        return await self._fetch(run, offset)

    async def _fetch(self, run: Run, offset: int) -> Page:
        """Read one page (its budget slot taken) within the lease; hand its tracked rows over."""
        if self._stopping.is_set():
            raise SweepEnded("stopped")
        if not await self._lease(
            keys=[keys.SWEEP_LEASE], args=[run.token, math.ceil(self.lease * 1000)]
        ):
            raise SweepEnded("lost_lease", "another worker holds the sweep lease")
        # Bounded well inside the lease, so no second sweep can start while this call runs.
        timeout = min(self.settings.upstream_timeout, self.lease / 2)
        tracer = setup.active()
        span = None
        if tracer is not None:
            # A page serves many jobs: its span is a trace of its own, linked to the jobs it
            # moved (and they to it), and kept only when it moved one.
            span = tracer.start_span("GET", context=spans.ROOT, kind=SpanKind.CLIENT)
        try:
            response = await self.upstream.request(
                "GET",
                LIST_PATH,
                params={"limit": str(self.settings.sweep_page_size), "offset": str(offset)},
                timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            )
        except AnswerTooLarge as exc:
            raise SweepEnded("bad_body", exc.message) from exc
        except UpstreamError as exc:
            raise SweepEnded("unreachable", exc.message) from exc
        if response.status_code == 429:
            pause = await self.schedule.pause_for_429(
                parse_retry_after(response.headers), met_by="a sweep"
            )
            raise SweepEnded("rate_limited", f"429 for {pause} s")
        if response.status_code != 200:
            raise SweepEnded("error", f"HTTP {response.status_code}")
        page = _page(offset, json_object(response.content))
        if page is None:
            raise SweepEnded("bad_body", "the list answer is not a page of requests")
        listed, rows = page
        SWEEP_PAGES.inc()
        run.pages += 1
        run.total = max(run.total, listed.total)
        if run.step is None and not listed.last_of_list:
            run.step = listed.size
        run.tally.add(listed.times)
        if span is None:
            await self._match(run, rows)
            return listed
        url = response.request.url
        span.set_attributes(
            {
                **spans.client_attributes("GET", url.scheme, url.host, url.port),
                "url.template": "/v1/lipsync/requests",
                "http.response.status_code": response.status_code,
                "relay.sweep.offset": offset,
            }
        )
        with trace.use_span(span, end_on_exit=False):  # the rows' handling sees it as current
            await self._match(run, rows, PageSpan(span, time.time_ns()))
        return listed

    async def _take_budget(self) -> None:
        asked = time.monotonic()
        while True:
            booked, wait = await self.schedule.reserve()
            if wait > 0:
                await asyncio.sleep(wait)
            if booked:
                SWEEP_PAGE_WAIT.observe(time.monotonic() - asked)
                return
            if self._stopping.is_set():
                raise SweepEnded("stopped")

    async def _match(
        self, run: Run, rows: list[dict[str, Any]], span: PageSpan | None = None
    ) -> None:
        """Find the rows that are outstanding tracked jobs not seen yet this sweep, count those
        the window expected, and hand them over to be handled while more pages are read."""
        fresh = {}
        for row in rows:
            rid = row.get("id")
            if isinstance(rid, str) and rid and rid not in run.seen:
                fresh[rid] = row
        if not fresh:
            return
        run.seen.update(fresh)  # before any await: pages read at once never share a row
        ids = list(fresh)
        polls, created = await batcher(self.redis).run(
            [("ZMSCORE", keys.POLLS, *ids), ("ZMSCORE", keys.CREATED, *ids)]
        )
        matched = {}
        for rid, due, tracked in zip(ids, polls, created, strict=True):
            if due is None:
                continue
            matched[rid] = fresh[rid]
            if tracked is None:
                continue
            if run.window_at - run.window <= tracked <= run.window_at:
                run.expected_seen += 1
            made = created_time(fresh[rid].get("created_at"))
            if made is not None:
                run.lag = max(run.lag if run.lag is not None else -math.inf, tracked - made)
        if run.lag is not None:
            # A tracked row further behind its tracking than the margin allowed (a watched or
            # adopted job, a relay started on a busy account): the window reaches back that far
            # in this sweep already. Learned only for the next one, each sweep read a page or
            # so deeper than the last, and the jobs below waited sweeps or per-id polls.
            widened = run.oldest - min(math.ceil(run.lag) + 1.0, MAX_MARGIN)
            run.start = min(run.start, widened)
        if matched:
            run.matched += len(matched)
            SWEEP_ROWS.inc(len(matched))
            run.handling.add(asyncio.create_task(self._handle(run, matched, span)))

    async def _handle(
        self, run: Run, by_id: dict[str, dict[str, Any]], span: PageSpan | None = None
    ) -> None:
        """Hand every matched row to the poller; `span`: the page's, when tracing, linked to
        every job whose status the page moved."""
        jobs = await self.store.get_many(list(by_id))
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
        moved = await asyncio.gather(*(self._observe(run, job, raw) for job, raw in slow))
        if span is not None:
            by_request = {job.request_id: job for job in jobs if job is not None}
            span.moved(
                by_request[record.request_id]
                for record in records
                if record.status != by_request[record.request_id].status
            )
            span.moved(job for (job, _), did in zip(slow, moved, strict=True) if did)
            span.close()

    async def _observe(self, run: Run, job: Job, raw: bytes) -> bool:
        if await self.poller.wrap_up(job):
            return False
        return await self.poller.observe(job, raw, hold=run.hold)


def _page(offset: int, body: dict[str, Any] | None) -> tuple[Page, list[dict[str, Any]]] | None:
    """A list answer as a Page and its rows; None when it is not such a page."""
    if body is None or not isinstance(body.get("data"), list):
        return None
    pagination = body.get("pagination")
    numbers: list[Any] = [
        pagination.get(name) if isinstance(pagination, dict) else None
        for name in ("limit", "total")
    ]
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers):
        return None
    limit, total = int(numbers[0]), int(numbers[1])
    if total < 0:
        return None
    entries: list[Any] = body["data"]
    rows = [row for row in entries if isinstance(row, dict)]
    page = Page(
        offset=offset,
        times=[created_time(row.get("created_at")) for row in rows],
        size=len(entries),
        # Trust what came back over what was asked: a limit of 0 or one below the rows
        # returned would end the read early, so the page's own size is the floor.
        limit=max(limit, len(entries), 1),
        total=total,
    )
    return page, rows
