"""Sweeps against a busy upstream: upstream calls per job, callback lag, refresh age, memory.

Run: uv run python bench/sweep.py [--jobs 1000] [--scale-jobs 100000] [--scale-seconds 300]
                                  [--only live,lag,fallback,scale] [--orders newest_first,...]
                                  [--precision seconds|microseconds] [--latency 0.15]

- live (the issue #19 case, bench/live.py): N jobs of 2-6 s submitted through `relay api` by 8
  callers with the official SDK as fast as the budget lets them, while earlier ones finish;
  upstream with 150 ms a call, whole-second created_at, pages of <= 100 rows, 20 calls/s,
  20,000 history rows; `relay api` and one `relay worker` at their default settings. Printed
  per list order: upstream status calls per job, callback lag after the upstream finished each
  job (split by whether it ended while submissions were still arriving), when the relay saw
  each end, how far apart list pages were read, sweeps by outcome (none may end early), and
  the API's and worker's CPU.

The older modes below keep the quiet case: jobs created upstream before the run, no latency.

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
  (Redis's `polled` field, or the job's creation when never refreshed), and how long the last
  whole sweep took; Redis memory per job. scale-live: the same in the live conditions (150 ms a
  call, whole seconds, both orders), the jobs made over the last 10 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import live
import uvicorn
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from store_reads import ended_at

from relay.devtools.embedded_redis import embedded_redis
from relay.devtools.ports import free_port
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
    sandbox_url: str,
    count: int,
    *,
    queued: float,
    processing: tuple[float, float],
    spread_over: float = 0.0,
) -> tuple[list[str], list[float]]:
    body = {
        "count": count,
        "queued_seconds": queued,
        "processing_seconds": list(processing),
        "spread_over": spread_over,
    }
    response = httpx.post(sandbox_url + "/_sandbox/requests", json=body, timeout=120)
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


async def backdate(redis_url: str, ids: list[str], spread: float) -> None:
    """Date each job's tracking to when the sandbox made it (job n of N `spread * (1 - n / N)`
    seconds ago), as a relay that tracked each job on its create would have: made over ten
    minutes, they were not all tracked at the bench's start."""
    redis = Redis.from_url(redis_url)
    seconds, micros = await redis.time()
    now = seconds + micros / 1e6
    for start in range(0, len(ids), 5000):
        async with redis.pipeline(transaction=False) as pipe:
            for n in range(start, min(start + 5000, len(ids))):
                made = now - spread * (1 - n / len(ids))
                pipe.zadd(keys.CREATED, {ids[n]: made})
                pipe.hset(keys.job(ids[n]), "created", made)
            await pipe.execute()
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


async def sweep_state(redis_url: str) -> dict[str, str]:
    redis = Redis.from_url(redis_url)
    try:
        raw = await redis.hgetall(keys.SWEEP_STATE)
    finally:
        await redis.aclose()
    return {k.decode(): v.decode() for k, v in raw.items()}


def scale_run(count: int, seconds: float, upstream: live.Upstream | None = None) -> None:
    """`upstream`: the live conditions (and jobs made over the last 10 minutes); None: the
    quiet ones (no latency, newest first, jobs made at one instant)."""
    receiver = Receiver()
    with (
        embedded_redis() as redis_url,
        live.sandbox(upstream) if upstream else sandbox("newest_first") as sandbox_url,
        serve(receiver.app()) as receiver_url,
    ):
        empty = asyncio.run(used_memory(redis_url))
        spread = 600.0 if upstream else 0.0
        ids, _ = create_upstream(
            sandbox_url, count, queued=86_400.0, processing=(1.0, 1.0), spread_over=spread
        )
        asyncio.run(track(redis_url, ids, receiver_url + "/hook"))
        if spread:
            asyncio.run(backdate(redis_url, ids, spread))
        conditions = upstream.describe() if upstream else "newest_first, no latency"
        print(f"\n{count:,} outstanding jobs (queued upstream all along), {conditions}")
        print(f"   {live.load()} at the start", flush=True)
        with worker(redis_url, sandbox_url):
            started = time.monotonic()
            samples: list[tuple[float, float, int]] = []
            durations: list[float] = []
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
                state = asyncio.run(sweep_state(redis_url))
                last = float(state.get("duration", "nan"))
                if last == last and (not durations or durations[-1] != last):  # not NaN, new
                    durations.append(last)
                print(
                    f"  t={samples[-1][0]:5.0f} s: oldest refresh {oldest:6.1f} s ago, "
                    f"never refreshed {never:,}; last whole sweep {state.get('duration', '-')} s",
                    flush=True,
                )
            calls = upstream_calls(sandbox_url)
            load_end = live.load()
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
    # A sweep reads the window's (count + margin rows) / 100 pages; the budget allows 10 a second.
    pages = math.ceil(count / 100)
    print(
        f"  whole sweeps took {', '.join(f'{d:.1f}' for d in durations) or '-'} s; "
        f"the budget allows ~{pages} pages in {pages / 10:.0f} s (target <= {pages / 10 * 1.1:.0f}"
        f" s); {load_end} at the end"
    )


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(sorted(times))]


def live_run(count: int, upstream: live.Upstream, callers: int, extra: dict[str, str]) -> None:
    print(f"\n== live: {count:,} jobs of 2-6 s through the relay's API; {upstream.describe()} ==")
    print(f"   {live.load()} at the start", flush=True)
    with (
        tempfile.TemporaryDirectory(prefix="sweep-live-") as logs,
        embedded_redis() as redis_url,
        live.sandbox(upstream) as sandbox_url,
        live.receivers(fast=4, hanging=0) as rx,
        live.relay(redis_url, sandbox_url, Path(logs), **extra) as relay,
        live.BudgetSampler(redis_url) as budget,
    ):
        before = live.sandbox_stats(sandbox_url)["calls"]
        cpu_start = relay.cpu()
        submitted = live.Callers(relay.api, lambda n: rx.fast[n % len(rx.fast)], callers)
        done = submitted.start(count).join()
        cpu_submit = relay.cpu()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            arrived, duplicates = rx.stats()
            if len(arrived) >= len(done.ids):
                break
            time.sleep(0.2)
        cpu_end = relay.cpu()
        stats = live.sandbox_stats(sandbox_url)
        finish = live.finishes(sandbox_url)
        samples = relay.metrics()
        ended = asyncio.run(ended_at(redis_url, done.ids))
        early = relay.worker_log.read_text().count("sweep ended early")
        load_end = live.load()
    after = stats["calls"]
    listed = after.get(LIST_ROUTE, 0) - before.get(LIST_ROUTE, 0)
    per_id = after.get(POLL_ROUTE, 0) - before.get(POLL_ROUTE, 0)
    window = done.last - done.first
    print(
        f"  submitted {len(done.ids):,} in {window:.1f} s ({len(done.ids) / window:.1f}/s; "
        f"{done.refused} 429s waited out, {len(done.errors)} errors); "
        f"called back {len(arrived):,} (duplicates: {duplicates})"
    )
    print(
        f"  upstream status calls: {listed} list pages + {per_id} per-id GETs = "
        f"{(listed + per_id) / max(1, len(done.ids)):.3f} per job (target <= 0.15)"
    )
    outcomes = live.sweep_outcomes(samples)
    print(f"  sweeps by outcome: {outcomes}; 'sweep ended early' log lines: {early}")
    offset = time.time() - time.monotonic()
    lags = {rid: arrived[rid] - finish[rid] for rid in done.ids if rid in arrived and rid in finish}
    seen = {rid: ended[rid] - offset - finish[rid] for rid in ended if rid in finish}
    during = [rid for rid in lags if finish[rid] <= done.last]
    later = [rid for rid in lags if finish[rid] > done.last]
    print(f"  callback lag after the upstream finished: {live.spread(list(lags.values()))}")
    print(
        f"    ended while submissions arrived ({len(during)}): "
        f"{live.spread([lags[r] for r in during])}"
    )
    print(
        f"    ended after the last submission ({len(later)}): "
        f"{live.spread([lags[r] for r in later])}"
    )
    print(
        f"  end seen by the relay: {live.spread(list(seen.values()))}; "
        f"end seen -> callback: {live.spread([lags[r] - seen[r] for r in lags if r in seen])}"
    )
    pages = stats["timestamps"].get(LIST_ROUTE, [])
    busy = [t for t in pages if done.first <= t <= done.last]
    quiet = [t for t in pages if t > done.last]
    print(
        f"  list pages apart, while submitting: {live.spread(gaps(busy))}; "
        f"after: {live.spread(gaps(quiet))}"
    )
    for name, ahead in budget.between(done.first, done.last).items():
        quiet_ahead = budget.between(done.last, float("inf"))[name]
        print(
            f"  {name} booked ahead of now, while submitting: {live.spread(ahead)}; "
            f"after: {live.spread(quiet_ahead)}"
        )
    api_busy, worker_busy = (b - a for a, b in zip(cpu_start, cpu_submit, strict=True))
    api_all, worker_all = (b - a for a, b in zip(cpu_start, cpu_end, strict=True))
    print(
        f"  CPU while submitting: API {api_busy / window:.0%}, worker {worker_busy / window:.0%} "
        f"of a core; whole run: API {api_all:.1f} s, worker {worker_all:.1f} s; "
        f"{load_end} at the end"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--scale-jobs", type=int, default=100_000)
    parser.add_argument("--scale-seconds", type=float, default=300)
    parser.add_argument("--only", default="live,lag,fallback,scale")
    parser.add_argument("--orders", default="newest_first,oldest_first")
    parser.add_argument("--precision", default="seconds", choices=["seconds", "microseconds"])
    parser.add_argument("--latency", type=float, default=0.15)
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--env", action="append", default=[], help="extra VAR=value for both")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    if "live" in parts:
        extra = dict(item.split("=", 1) for item in args.env)
        for name in args.orders.split(","):
            upstream = live.Upstream(
                order=cast(ListOrder, name), precision=args.precision, latency=args.latency
            )
            live_run(args.jobs, upstream, args.callers, extra)
    if "lag" in parts:
        for order in ("newest_first", "oldest_first"):
            lag_run(args.jobs, order)
    if "fallback" in parts:
        failing = {"status": 500, "count": 1_000_000, "paths": LIST_ROUTE}
        lag_run(args.jobs // 5, "newest_first", failing)
        lag_run(args.jobs // 5, "shuffled")
    if "scale" in parts:
        scale_run(args.scale_jobs, args.scale_seconds)
    if "scale-live" in parts:
        for name in args.orders.split(","):
            conditions = live.Upstream(
                order=cast(ListOrder, name), precision=args.precision, latency=args.latency
            )
            scale_run(args.scale_jobs, args.scale_seconds, conditions)


if __name__ == "__main__":
    main()
