"""Workers and APIs whose clocks are wrong: every decision about a job is made on Redis's clock.

A worker (or an API process) runs under libfaketime (the one the `libfaketime` package bundles),
10 minutes fast or slow, next to Redis and the test, which keep the machine's own clock.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import httpx
import libfaketime
import pytest
import redis

from relay.devtools.ports import free_port
from relay.redis import keys
from tests.helpers import POLL_ROUTE, submit, verified
from tests.stack import RELAY_KEY, Stack, eventually, job_field, relay_stack, serving

# The library the `libfaketime` wheel bundles (a dev dependency), so these tests run wherever
# `uv run pytest` does; a checkout without it fails here, loudly, rather than skipping.
LIBFAKETIME = Path(libfaketime.__file__).parent / "vendor/libfaketime/src/libfaketime.so.1"
if not LIBFAKETIME.is_file():
    raise RuntimeError(f"the libfaketime package no longer ships {LIBFAKETIME}")

SKEWS = {"fast": "+10m", "slow": "-10m"}


def skewed(offset: str) -> dict[str, str]:
    """Environment that runs a process `offset` off the real clock (e.g. "+10m")."""
    preload = " ".join(filter(None, [str(LIBFAKETIME), os.environ.get("LD_PRELOAD")]))
    return {"LD_PRELOAD": preload, "FAKETIME": offset}


def redis_now(redis_url: str) -> float:
    client = redis.Redis.from_url(redis_url)
    try:
        seconds, micros = cast(tuple[int, int], client.time())
    finally:
        client.close()
    return seconds + micros / 1e6


def start_skewed_worker(stack: Stack, offset: str) -> None:
    stack.start_worker(**skewed(offset))
    worker = stack.workers[-1]
    assert isinstance(worker, subprocess.Popen)
    serving(worker, stack.worker_urls[-1])


@contextlib.contextmanager
def skewed_api(stack: Stack, offset: str) -> Iterator[str]:
    """A second API process, `offset` off the real clock, beside the stack's; yields its URL."""
    port = free_port()
    # Its stderr goes to the test's output, shown when the test fails.
    api = subprocess.Popen(
        [sys.executable, "-m", "relay.cli", "api", "--port", str(port)],
        env={**stack.env, **skewed(offset)},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        serving(api, url)
        yield url
    finally:
        api.terminate()
        api.wait(timeout=30)


def test_faketime_really_moves_a_workers_clock(redis_url: str) -> None:
    """The premise of this file: the preloaded library changes what Python reads."""
    moved = subprocess.run(
        [sys.executable, "-c", "import time; print(time.time())"],
        env={**os.environ, **skewed("+10m")},
        capture_output=True,
        check=True,
    )
    assert float(moved.stdout) - redis_now(redis_url) > 590


@pytest.mark.parametrize("offset", SKEWS.values(), ids=SKEWS.keys())
def test_the_relay_clock_of_a_skewed_process_is_redis_time(redis_url: str, offset: str) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, time
        from redis.asyncio import Redis
        from relay.redis.clock import RedisClock

        async def main():
            client = Redis.from_url({redis_url!r})
            clock = RedisClock(client)
            await clock.sync()
            print(clock.now(), time.time())
            await client.aclose()

        asyncio.run(main())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, **skewed(offset)},
        capture_output=True,
        check=True,
    )
    relay_now, own_now = map(float, out.stdout.split())
    now = redis_now(redis_url)
    assert abs(own_now - now) > 590  # the process's own clock is off
    assert abs(relay_now - now) < 5  # the relay's clock is not (slack: process start-up)


@pytest.mark.parametrize("offset", SKEWS.values(), ids=SKEWS.keys())
def test_a_skewed_worker_rides_out_a_single_404(redis_url: str, offset: str) -> None:
    env = {"RELAY_NOT_FOUND_GRACE": "300", "RELAY_SWEEP_INTERVAL": "0"}
    with relay_stack(redis_url, workers=0, env=env) as stack:
        start_skewed_worker(stack, offset)
        stack.upstream("POST", "/_sandbox/faults", json={"status": 404, "paths": POLL_ROUTE})
        request_id = submit(stack)
        [callback] = stack.receiver.wait_for(1, timeout=30)
        # Verified as a receiver does: its clock, not the worker's, judges webhook-timestamp.
        assert verified(stack, callback)["type"] == "lipsync.completed"
        assert job_field(redis_url, request_id, "status") == b"completed"
        calls = stack.upstream("GET", "/_sandbox/stats").json()["calls"]
        assert calls[POLL_ROUTE] >= 2, "the 404 was seen, then the job found again"


# The deferral the next test's retry waits. The skewed worker takes over well inside it: it is
# up (its import, under load, is the slow part) before the worker with a right clock leaves,
# so a fast clock would show as a retry made at once, long before the deferral is up.
DEFERRAL = 10.0
TAKE_OVER_BY = DEFERRAL * 0.9 - 2.0


@pytest.mark.long
@pytest.mark.parametrize("offset", SKEWS.values(), ids=SKEWS.keys())
def test_a_skewed_worker_makes_a_deferred_retry_on_time(redis_url: str, offset: str) -> None:
    """A retry deferred by DEFERRAL (±10 %) by a worker with a right clock is made by a skewed
    one: neither early (a fast clock finds it due at once) nor 10 minutes late (a slow one)."""
    env = {"RELAY_DELIVERY_RETRY_SCHEDULE": f"0,{DEFERRAL:g}"}
    with relay_stack(redis_url, env=env) as stack:
        stack.receiver.script = [500]
        request_id = submit(stack)
        [first] = stack.receiver.wait_for(1)
        # The failure is recorded and attempt 1 queued; the skewed worker comes up, then the
        # worker that did it leaves.
        eventually(lambda: job_field(redis_url, request_id, "attempt") == b"1")
        assert redis.Redis.from_url(redis_url).zscore(
            keys.ARQ_QUEUE, keys.delivery_job_id(request_id, 1)
        )
        start_skewed_worker(stack, offset)
        assert stack.stop_worker(stack.workers[0], signal.SIGTERM) == 0
        took_over = time.monotonic() - first.at
        assert took_over < TAKE_OVER_BY, (
            f"the skewed worker took over {took_over:.1f} s after the first attempt, too late "
            "to tell an early retry from one on time"
        )
        first, second = stack.receiver.wait_for(2, timeout=60)
        assert second.at - first.at >= DEFERRAL * 0.9 - 0.1, "the retry was made early"
        assert verified(stack, second)["type"] == "lipsync.completed"
        # The receiver records a callback before it answers: the worker records the outcome after.
        eventually(lambda: job_field(redis_url, request_id, "delivery") == b"delivered")


@pytest.mark.parametrize("ask", ["redeliver", "recover"])
def test_a_redelivery_asked_of_a_fast_api_is_made_at_once(redis_url: str, ask: str) -> None:
    """A redelivery (one job's, or recovered in bulk) requested through an API process whose
    clock is 10 minutes fast is queued on Redis's clock, so it is made now, not 10 minutes on."""
    with relay_stack(redis_url, env={"RELAY_DELIVERY_RETRY_SCHEDULE": "0"}) as stack:
        stack.receiver.script = [500]
        request_id = submit(stack)
        stack.receiver.wait_for(1)
        eventually(lambda: job_field(redis_url, request_id, "delivery") == b"failed")
        with skewed_api(stack, SKEWS["fast"]) as api_url:
            path, body = (
                (f"/jobs/{request_id}/redeliver", None)
                if ask == "redeliver"
                else ("/deliveries/recover", {"since": 0})
            )
            answer = httpx.post(
                api_url + "/api/relay/v1" + path, json=body, headers={"x-api-key": RELAY_KEY}
            )
            assert answer.status_code == (202 if ask == "redeliver" else 200), answer.text
            attempt = int(job_field(redis_url, request_id, "attempt") or 0)
            assert attempt == 1
            client = redis.Redis.from_url(redis_url)
            try:
                job_id = keys.delivery_job_id(request_id, attempt)
                score = cast(float | None, client.zscore(keys.ARQ_QUEUE, job_id))
            finally:
                client.close()
            # Still queued, or already picked (arq keeps it in the queue while it runs).
            if score is not None:
                ahead = score / 1000 - redis_now(redis_url)
                assert ahead < 5, f"queued {ahead:.0f} s ahead of Redis's clock"
            first, second = stack.receiver.wait_for(2, timeout=20)
            assert second.headers["webhook-id"] == first.headers["webhook-id"]
            assert verified(stack, second)["type"] == "lipsync.completed"
        eventually(lambda: job_field(redis_url, request_id, "delivery") == b"delivered")
