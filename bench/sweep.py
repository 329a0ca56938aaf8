"""Sweeps against a busy upstream: upstream calls per job, callback lag, refresh age, memory.

Run: uv run python bench/sweep.py [--jobs 1000] [--scale-jobs 100000] [--scale-seconds 300]
                                  [--only lag,fallback,scale]

The sandbox upstream runs in a process of its own, as Chamelaion would: its list capped at 100
items a page, 20 upstream calls/s in total (429 beyond), and 20,000 finished requests from before
the relay started. One `relay worker` runs with the default settings (upstream budget 10/s,
sweep every 1 s, pages of up to 1000 asked for). Jobs are created upstream in bulk through the
sandbox's control endpoint and tracked through the relay's own JobStore.create (what the API
does once Chamelaion accepted a job), so the run measures polling and callbacks, not submits.

- lag: N jobs of 2-6 s, all outstanding at once, for each list order: upstream calls (list
  pages + per-id GETs) per job, and how long after the upstream finished each job its callback
  arrived (the sandbox reports when each job finishes on the shared monotonic clock).
- fallback: the same with the list failing (HTTP 500), then answering in no usable order: every
  job is still called back, by per-id polls.
- scale: many outstanding jobs that stay queued; every 10 s, the oldest status refresh among them
  (Redis's `polled` field, or the job's creation when never refreshed); Redis memory per job.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import uvicorn
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from store_reads import ended_at

from relay.devtools.embedded_redis import embedded_redis, free_port
from relay.jobs.store import JobStore
from relay.redis import keys
from relay.sandbox import SandboxConfig, create_sandbox_app
from relay.sandbox.state import ListOrder
from relay.serving import EmbeddedServer

SANDBOX_KEY = "sandbox-key"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
LIST_ROUTE = "GET /v1/lipsync/requests"
POLL_ROUTE = "GET /v1/lipsync/requests/{id}"


def run_sandbox(port: int, order: ListOrder) -> None:
    config = SandboxConfig(
        api_keys=(SANDBOX_KEY,),
        list_order=order,
        list_max_limit=100,
        history=20_000,
        rate_limit_per_second=20,
    )
    uvicorn.run(create_sandbox_app(config), host="127.0.0.1", port=port, log_level="warning")


@contextlib.contextmanager
def sandbox(order: ListOrder) -> Iterator[str]:
    port = free_port()
    proc = multiprocessing.get_context("spawn").Process(target=run_sandbox, args=(port, order))
    proc.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_up(url + "/api/health")
        yield url
    finally:
        proc.terminate()
        proc.join()


def wait_up(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


class Receiver:
    """Callbacks as they arrive: request id -> arrival on the monotonic clock."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.duplicates = 0
        self.lock = threading.Lock()

    def app(self) -> Starlette:
        import orjson

        async def hook(request: Request) -> Response:
            at = time.monotonic()
            request_id = orjson.loads(await request.body())["data"]["id"]
            with self.lock:
                if request_id in self.arrived:
                    self.duplicates += 1
                self.arrived.setdefault(request_id, at)
            return Response(status_code=204)

        return Starlette(routes=[Route("/hook", hook, methods=["POST"])])


@contextlib.contextmanager
def serve(app: Starlette) -> Iterator[str]:
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = EmbeddedServer(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def worker(redis_url: str, sandbox_url: str) -> Iterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "CHAMELAION_"))}
    env |= {
        "CHAMELAION_BASE_URL": sandbox_url + "/api",
        "CHAMELAION_API_KEY": SANDBOX_KEY,
        "RELAY_REDIS_URL": redis_url,
        "RELAY_WEBHOOK_SECRETS": SECRET,
        "RELAY_CALLBACK_ALLOWED_NETWORKS": "127.0.0.0/8",
        # Receivers listen on free loopback ports, outside the default port list.
        "RELAY_CALLBACK_ALLOWED_PORTS": "1-65535",
        "RELAY_WORKER_HTTP_PORT": str(port),
        "RELAY_LOG_FORMAT": "json",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay.cli", "worker"], env=env, stderr=subprocess.DEVNULL
    )
    try:
        wait_up(f"http://127.0.0.1:{port}/healthz")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def upstream_calls(sandbox_url: str) -> dict[str, int]:
    calls: dict[str, int] = httpx.get(sandbox_url + "/_sandbox/stats").json()["calls"]
    return calls


def create_upstream(
    sandbox_url: str, count: int, *, queued: float, processing: tuple[float, float]
) -> tuple[list[str], list[float]]:
    response = httpx.post(
        sandbox_url + "/_sandbox/requests",
        json={"count": count, "queued_seconds": queued, "processing_seconds": list(processing)},
        timeout=120,
    )
    response.raise_for_status()
    body = response.json()
    return body["ids"], body["finishes"]


async def track(redis_url: str, ids: list[str], callback_url: str) -> None:
    """Record the jobs as the API does after Chamelaion accepted them (first poll in 2 s)."""
    redis = Redis.from_url(redis_url)
    store = JobStore(redis)
    for start in range(0, len(ids), 1000):
        await asyncio.gather(
            *(
                store.create(rid, callback_url=callback_url, reference_id=None, first_poll_in=2.0)
                for rid in ids[start : start + 1000]
            )
        )
    await redis.aclose()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


def lag_run(count: int, order: ListOrder, fault: dict[str, Any] | None = None) -> None:
    label = f"{count:,} jobs of 2-6 s, {order}" + (f", list fault {fault}" if fault else "")
    receiver = Receiver()
    with (
        embedded_redis() as redis_url,
        sandbox(order) as sandbox_url,
        serve(receiver.app()) as receiver_url,
        worker(redis_url, sandbox_url),
    ):
        if fault:
            httpx.post(sandbox_url + "/_sandbox/faults", json=fault).raise_for_status()
        before = upstream_calls(sandbox_url)
        started = time.monotonic()
        ids, finishes = create_upstream(sandbox_url, count, queued=0.0, processing=(2.0, 6.0))
        asyncio.run(track(redis_url, ids, receiver_url + "/hook"))
        deadline = time.monotonic() + 600
        while len(receiver.arrived) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        after = upstream_calls(sandbox_url)
        ended = asyncio.run(ended_at(redis_url, ids))
    listed = after.get(LIST_ROUTE, 0) - before.get(LIST_ROUTE, 0)
    per_id = after.get(POLL_ROUTE, 0) - before.get(POLL_ROUTE, 0)
    lags = [
        receiver.arrived[rid] - finish
        for rid, finish in zip(ids, finishes, strict=True)
        if rid in receiver.arrived
    ]
    print(f"\n{label}")
    print(
        f"  called back: {len(receiver.arrived):,}/{count:,} in {elapsed:.1f} s "
        f"(duplicates: {receiver.duplicates})"
    )
    print(
        f"  upstream calls: {listed} list pages + {per_id} per-id GETs = "
        f"{(listed + per_id) / count:.3f} per job"
    )
    # Redis's clock is wall time, the sandbox's monotonic: map one onto the other.
    offset = time.time() - time.monotonic()
    seen = [
        ended[rid] - offset - finish
        for rid, finish in zip(ids, finishes, strict=True)
        if rid in ended
    ]
    if seen:
        print(
            f"  end seen by the relay after the upstream finished: "
            f"p50 {percentile(seen, 0.5):.2f} s, p99 {percentile(seen, 0.99):.2f} s"
        )
    if lags:
        print(
            f"  callback lag after the upstream finished: p50 {percentile(lags, 0.5):.2f} s, "
            f"p99 {percentile(lags, 0.99):.2f} s, max {max(lags):.2f} s"
        )


async def refresh_ages(redis: Redis, ids: list[str]) -> tuple[float, int]:
    """The oldest status refresh among `ids` (seconds ago) and how many were never refreshed."""
    ages: list[float] = []
    never = 0
    seconds, micros = await redis.time()
    now = seconds + micros / 1e6
    for start in range(0, len(ids), 5000):
        async with redis.pipeline(transaction=False) as pipe:
            for rid in ids[start : start + 5000]:
                pipe.hmget(keys.job(rid), ["polled", "created"])
            rows = await pipe.execute()
        for polled, created in rows:
            if polled is None:
                never += 1
            ages.append(now - float(polled or created))
    return max(ages), never


async def used_memory(redis_url: str) -> int:
    redis = Redis.from_url(redis_url)
    info = await redis.info("memory")
    await redis.aclose()
    return int(info["used_memory"])


def scale_run(count: int, seconds: float) -> None:
    receiver = Receiver()
    with (
        embedded_redis() as redis_url,
        sandbox("newest_first") as sandbox_url,
        serve(receiver.app()) as receiver_url,
    ):
        empty = asyncio.run(used_memory(redis_url))
        ids, _ = create_upstream(sandbox_url, count, queued=86_400.0, processing=(1.0, 1.0))
        asyncio.run(track(redis_url, ids, receiver_url + "/hook"))
        print(f"\n{count:,} outstanding jobs (queued upstream all along), newest_first list")
        with worker(redis_url, sandbox_url):
            started = time.monotonic()
            samples: list[tuple[float, float, int]] = []
            while (elapsed := time.monotonic() - started) < seconds:
                time.sleep(10)

                async def sample() -> tuple[float, int]:
                    redis = Redis.from_url(redis_url)
                    try:
                        return await refresh_ages(redis, ids)
                    finally:
                        await redis.aclose()

                oldest, never = asyncio.run(sample())
                samples.append((time.monotonic() - started, oldest, never))
                print(
                    f"  t={samples[-1][0]:5.0f} s: oldest refresh {oldest:6.1f} s ago, "
                    f"never refreshed {never:,}",
                    flush=True,
                )
            calls = upstream_calls(sandbox_url)
        used = asyncio.run(used_memory(redis_url)) - empty
    steady = [oldest for at, oldest, never in samples if never == 0]
    print(
        f"  upstream calls in {elapsed:.0f} s: {calls.get(LIST_ROUTE, 0)} list pages, "
        f"{calls.get(POLL_ROUTE, 0)} per-id GETs"
    )
    if steady:
        print(
            f"  once every job had been refreshed: oldest refresh at most {max(steady):.1f} s ago"
        )
    print(f"  redis memory: {used / 2**20:.1f} MiB, {used / count:.0f} bytes per job")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--scale-jobs", type=int, default=100_000)
    parser.add_argument("--scale-seconds", type=float, default=300)
    parser.add_argument("--only", default="lag,fallback,scale")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    if "lag" in parts:
        for order in ("newest_first", "oldest_first"):
            lag_run(args.jobs, order)
    if "fallback" in parts:
        failing = {"status": 500, "count": 1_000_000, "paths": LIST_ROUTE}
        lag_run(args.jobs // 5, "newest_first", failing)
        lag_run(args.jobs // 5, "shuffled")
    if "scale" in parts:
        scale_run(args.scale_jobs, args.scale_seconds)


if __name__ == "__main__":
    main()
