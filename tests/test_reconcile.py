"""The intent reconcile (relay.jobs.reconcile) as a worker builds it, on a real Redis and the
sandbox upstream: a lookup by reference_id may read several list pages, and each page spends a
slot of the shared upstream budget, as a sweep's page does; a 429 it meets pauses everyone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from relay.api.budget import ApiBudget
from relay.jobs.fair_share import FairShare
from relay.jobs.intents import Intent, Intents
from relay.jobs.schedule import PollSchedule
from relay.jobs.store import JobStore
from relay.redis import keys
from relay.sandbox import SandboxConfig, create_sandbox_app
from relay.settings import load_settings
from relay.upstream import Upstream
from relay.worker.process import WorkerState
from tests.helpers import worker_state
from tests.servers import serve
from tests.stack import SANDBOX_KEY

RATE = 4.0  # upstream calls per second: slow enough to tell slots apart, quick enough to test
PAGE_CAP = 2  # the most rows the sandbox lists per page, so a few rows take several pages
ROWS = 7  # rows with one reference_id: 4 pages
PAGES = 4
LIST = "GET /v1/lipsync/requests"
INPUTS = [
    {"type": "video", "url": "https://cdn.example.com/v.mp4"},
    {"type": "audio", "url": "https://cdn.example.com/a.wav"},
]


@pytest.fixture
def sandbox_url() -> Iterator[str]:
    config = SandboxConfig(api_keys=(SANDBOX_KEY,), list_max_limit=PAGE_CAP)
    with serve(create_sandbox_app(config)) as url:
        yield url


@pytest.fixture
async def worker(redis_url: str, sandbox_url: str) -> AsyncIterator[WorkerState]:
    async with worker_state(
        redis_url,
        CHAMELAION_BASE_URL=sandbox_url + "/api",
        RELAY_UPSTREAM_RATE_LIMIT=str(RATE),
    ) as state:
        yield state


def sandbox(url: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    response = httpx.request(method, url + path, headers={"x-api-key": SANDBOX_KEY}, **kwargs)
    response.raise_for_status()
    return response


def create_rows(url: str, reference_id: str, count: int) -> None:
    """Jobs with `reference_id` made upstream just now (by other callers, or retries)."""
    for _ in range(count):
        body = {"inputs": INPUTS, "reference_id": reference_id}
        sandbox(url, "POST", "/api/v1/lipsync/generate", json=body)


def list_calls(url: str) -> tuple[int, list[float]]:
    """How many list pages the sandbox was asked for, and when (its monotonic clock)."""
    stats = sandbox(url, "GET", "/_sandbox/stats").json()
    calls: int = stats["calls"].get(LIST, 0)
    times: list[float] = stats["timestamps"].get(LIST, [])
    return calls, times


async def redis_now(redis: Redis) -> float:
    seconds, micros = await redis.time()
    return float(seconds) + float(micros) / 1e6


BUDGET_KEYS = (keys.UPSTREAM_TAT, keys.UPSTREAM_READS_TAT)
END = b"end of the test's bookings"


@contextlib.asynccontextmanager
async def bookings(redis: Redis) -> AsyncIterator[Callable[[], Awaitable[int]]]:
    """Counts the slots of the upstream budget booked in the block, in both its parts: each
    booking is one SET of a part's arrival time, which Redis's keyspace notifications tell.
    (Inferring them from how far the arrival times moved counted an extra slot whenever the
    first booking came a fraction of a period late, as on a loaded machine.)"""
    await redis.config_set("notify-keyspace-events", "K$")
    pubsub = redis.pubsub()
    channels = [f"__keyspace@0__:{key}" for key in BUDGET_KEYS]
    await pubsub.subscribe(*channels)

    async def count() -> int:
        # Redis sends one subscriber its messages in order: all bookings come before this.
        await redis.publish(channels[0], END)
        sets = 0
        async with asyncio.timeout(10):
            async for message in pubsub.listen():
                if message["type"] != "message":
                    continue
                if message["data"] == END:
                    return sets
                sets += message["data"] == b"set"
        raise AssertionError("unreachable: listen() ends only when the pubsub closes")

    try:
        yield count
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await redis.config_set("notify-keyspace-events", "")


async def due_intent(intents: Intents, reference_id: str) -> Intent:
    """An intent the API handed over, due for the reconcile now."""
    intent, _ = await intents.open(
        reference_id=reference_id,
        idempotency_key=None,
        callback_url=None,
        events=None,
        metadata=None,
    )
    await intents.leave_to_reconcile(intent, after=0)
    return intent


async def test_a_reconcile_lookup_spends_one_slot_per_list_page(
    worker: WorkerState, sandbox_url: str
) -> None:
    create_rows(sandbox_url, "dub-many", ROWS)
    await due_intent(worker.reconciler.intents, "dub-many")
    async with bookings(worker.redis) as booked:
        # Several rows could be its job: nothing is adopted; the intent waits for a later look.
        assert await worker.reconciler.reconcile_once() == 0
        calls, times = list_calls(sandbox_url)
        assert calls == PAGES
        assert await booked() == calls
    # So the pages go out at the budget's pace, not at once (a burst of one in each part).
    assert times[-1] - times[0] >= 0.8 * (calls - 2) / RATE, times


async def test_a_429_met_by_a_reconcile_lookup_pauses_everyone(
    worker: WorkerState, sandbox_url: str
) -> None:
    create_rows(sandbox_url, "dub-a", 1)
    create_rows(sandbox_url, "dub-b", 1)
    fault = {"status": 429, "retry_after": 30, "paths": LIST, "count": 1}
    sandbox(sandbox_url, "POST", "/_sandbox/faults", json=fault)
    for reference_id in ("dub-a", "dub-b"):
        await due_intent(worker.reconciler.intents, reference_id)
    await worker.reconciler.reconcile_once()
    paused_until = float(await worker.redis.get(keys.UPSTREAM_PAUSED) or 0)
    assert 25 < paused_until - await redis_now(worker.redis) <= 30
    # The other intent due is not looked up during the pause: it waits, as polls and sweeps do.
    calls, _ = list_calls(sandbox_url)
    assert calls == 1
    # One 429, counted once (the console's stat).
    minutes = [k async for k in worker.redis.scan_iter(keys.STATS_PREFIX + "rate_limited:*")]
    assert sum([int(await worker.redis.get(minute) or 0) for minute in minutes]) == 1


async def test_the_apis_lookup_spends_one_slot_per_list_page(
    redis: Redis, sandbox_url: str
) -> None:
    # The API's client spends its budget on every call itself: the lookup must not spend again.
    settings = load_settings(CHAMELAION_API_KEY=SANDBOX_KEY, RELAY_UPSTREAM_RATE_LIMIT=str(RATE))
    schedule = PollSchedule(redis, rate=RATE, lease=30)
    upstream = Upstream(
        sandbox_url + "/api",
        SANDBOX_KEY,
        timeout=5,
        budget=ApiBudget(FairShare(redis, schedule), max_wait=5),
    )
    intents = Intents(redis, JobStore(redis), settings)
    create_rows(sandbox_url, "dub-api", ROWS)
    intent = await due_intent(intents, "dub-api")
    async with bookings(redis) as booked:
        try:
            found = await intents.look(intent, upstream, timeout=5)
        finally:
            await upstream.aclose()
        assert len(found.candidates) == ROWS
        calls, _ = list_calls(sandbox_url)
        assert calls == PAGES
        assert await booked() == calls
