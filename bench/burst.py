"""Callback bursts: many jobs end at one instant; how fast do their callbacks go out?

Run: uv run python bench/burst.py [--jobs 2000] [--hanging 100] [--hang 10] [--memory 20000]
     uv run python bench/burst.py --tracing [--together] [--jobs 2000] [--rounds 3]

`--tracing`: the quiet case without hanging receivers, `--rounds` times with the worker's tracing
off and on in turn, each way first in every other round (OTLP/HTTP to a local receiver,
bench/otlp_sink.py, in a process of its own); every job carries a submission's trace context in
both. Printed: the worker's CPU per ended job each way (its event loop's thread apart), their
ratio (target <= 1.15), and the mean of the rounds' ratios with its margin. With `--together`,
each round runs both ways at once, each on a stand-in upstream, receivers and Redis of its own,
finishing their jobs at the same instant: one after the other, two runs of the same code on this
shared machine differ by up to a quarter, and a pair that shares every instant also shares
whatever else the machine was doing.
     uv run python bench/burst.py --live [--jobs 2000] [--orders newest_first,oldest_first]

`--live` is the issue #19 case (bench/live.py): the jobs are submitted through `relay api` by
8 callers with the official SDK, the sandbox upstream answers in 150 ms a call, at most 100
rows a page and 20 calls/s, holding 20,000 older requests, with whole-second created_at, and
`relay api` and one `relay worker` run at their default settings (budget 10 calls/s). Once the
relay has seen every job, the sandbox finishes all N at one instant (with `--flood`, while the
callers go on submitting jobs that stay queued); 5 % of them call back to a receiver that hangs
`--hang` seconds on a host of its own (127.0.0.2). Printed per list order: how long after the finish
the last fast callback arrived (target: within 3 s), p50/p99, and the ends as the relay saw them.

Without `--live`, the quiet case:

Real parts: a real redis-server and `relay worker` as a subprocess. Outside the relay, in two
processes of their own: a stand-in upstream (aiohttp) that answers `processing` for every job
until told to finish them all at once, and the receivers (aiohttp): fast ones that answer 204
at once on four ports, and hanging ones on another port that answer only after `--hang`
seconds. Jobs are written straight into the relay's store (the submit path is bench/forward.py's
business), all due for polling at once, with the upstream budget raised out of the way.

Printed per scenario (with the hanging receivers, then without): how long after the finish the
last fast receiver got its callback (drain), fast callbacks per second over that time, and p50
and p99 of (callback received - finish) for the fast receivers; then the same measured from when
the relay saw each job end (its `ended` time), which leaves polling out. `--memory N` adds a run
of N callbacks (default 20,000) and prints the worker's RSS before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import httpx
import live
import redis.asyncio as aioredis
from aiohttp import web
from aioserve import post_app, serve_forever
from forward import thread_cpu_seconds
from store_reads import ended_at

from relay.devtools.embedded_redis import embedded_redis
from relay.devtools.ports import free_port
from relay.jobs.store import JobStore
from relay.redis import keys
from relay.sandbox.state import ListOrder

FAST_PORTS = 4
# The stand-in's largest list page (Chamelaion documents none; the relay reads what it gets).
LIST_PAGE_CAP = 1000
POLL_INTERVAL = "1"


# --- the stand-in upstream and the receivers, each in a process of its own ------------------


def run_upstream(port: int) -> None:
    finished_at: list[float] = []
    polls = [0]
    lists = [0]
    # Registered jobs, newest first (the order Chamelaion's list is read in here), with their
    # creation times: the relay's sweeps page through this list as they would Chamelaion's.
    listed: list[tuple[str, str]] = []

    def lipsync_request(request_id: str, created_at: str) -> dict[str, str]:
        status = "completed" if finished_at else "processing"
        body = {"id": request_id, "status": status, "created_at": created_at}
        if finished_at:
            body["output_url"] = f"https://cdn.example.com/{request_id}.mp4"
        return body

    async def get_request(request: web.Request) -> web.Response:
        polls[0] += 1
        return web.json_response(lipsync_request(request.match_info["id"], "2026-01-01T00:00:00Z"))

    async def list_requests(request: web.Request) -> web.Response:
        lists[0] += 1
        limit = min(int(request.query.get("limit", "100")), LIST_PAGE_CAP)
        offset = int(request.query.get("offset", "0"))
        rows = [lipsync_request(rid, at) for rid, at in listed[offset : offset + limit]]
        pagination = {"total": len(listed), "limit": limit, "offset": offset}
        return web.json_response({"data": rows, "pagination": pagination})

    async def register(request: web.Request) -> web.Response:
        ids = await request.json()
        base = time.time()
        # A millisecond apart, so the list's order can be read from created_at.
        stamped = [
            (rid, datetime.fromtimestamp(base + n / 1000, UTC).isoformat().replace("+00:00", "Z"))
            for n, rid in enumerate(ids)
        ]
        listed[:0] = reversed(stamped)
        return web.json_response({"listed": len(listed)})

    async def finish(request: web.Request) -> web.Response:
        finished_at.append(time.time())
        return web.json_response({"at": finished_at[0]})

    async def reset(request: web.Request) -> web.Response:
        finished_at.clear()
        listed.clear()
        return web.json_response({})

    async def count(request: web.Request) -> web.Response:
        return web.json_response({"polls": polls[0], "lists": lists[0]})

    app = web.Application()
    app.router.add_get("/polls", count)
    app.router.add_get("/api/v1/lipsync/requests/{id}", get_request)
    app.router.add_get("/api/v1/lipsync/requests", list_requests)
    app.router.add_post("/register", register)
    app.router.add_post("/finish", finish)
    app.router.add_post("/reset", reset)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def run_receivers(control_port: int, fast_ports: list[int], hang_port: int, hang: float) -> None:
    received: dict[str, float] = {}
    concurrent = {"now": 0, "max": 0}

    async def fast(request: web.Request) -> web.Response:
        await request.read()
        received[request.headers["webhook-id"]] = time.time()
        return web.Response(status=204)

    async def slow(request: web.Request) -> web.Response:
        await request.read()
        concurrent["now"] += 1
        concurrent["max"] = max(concurrent["max"], concurrent["now"])
        try:
            await asyncio.sleep(hang)
        finally:
            concurrent["now"] -= 1
        received[request.headers["webhook-id"]] = time.time()
        return web.Response(status=204)

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"received": received, "hang_max_in_flight": concurrent["max"]})

    async def reset(request: web.Request) -> web.Response:
        received.clear()
        concurrent["max"] = 0
        return web.json_response({})

    control = web.Application()
    control.router.add_get("/stats", stats)
    control.router.add_post("/reset", reset)
    apps = [(post_app("/hook/{n}", fast), port) for port in fast_ports]
    asyncio.run(
        serve_forever([*apps, (post_app("/hook/{n}", slow), hang_port), (control, control_port)])
    )


# --- the bench ----------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def wait_http(url: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=0.5)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


@contextmanager
def worker(env: dict[str, str], http_port: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay.cli", "worker"],
        env={**env, "RELAY_WORKER_HTTP_PORT": str(http_port)},
        stdout=subprocess.DEVNULL,
        stderr=open(os.environ.get("BURST_WORKER_LOG", os.devnull), "ab"),  # noqa: SIM115
    )
    try:
        wait_http(f"http://127.0.0.1:{http_port}/healthz")
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Bench:
    def __init__(
        self, redis_url: str, upstream: str, receivers: str, fast_ports: list[int], hang_port: int
    ) -> None:
        self.redis_url = redis_url
        self.upstream = upstream
        self.receivers = receivers
        self.fast_ports = fast_ports
        self.hang_port = hang_port
        self.profile = ""
        self.runs = 0  # scenarios run so far (each one's profile is a file of its own)
        self.name = ""  # what its scenarios are called in the output (and profiles' names)
        # Where a scenario waits before the finish for another bench's, when two run at once.
        self.start_line: threading.Barrier | None = None
        self.per_id = False
        self.traced = False  # jobs carry a submission's trace context, as a traced API stores

    async def create_jobs(
        self, fast: int, hanging: int, *, prefix: str = "", flush: bool = True
    ) -> dict[str, str]:
        """Track `fast + hanging` jobs, due now (ids start with `prefix`), after emptying Redis
        unless not `flush`; returns request id -> 'fast' | 'hang'."""
        client = aioredis.Redis.from_url(self.redis_url)
        if flush:
            await client.flushall()
        store = JobStore(client)
        kinds: dict[str, str] = {}
        sem = asyncio.Semaphore(64)

        async def one(n: int, kind: str) -> None:
            port = self.hang_port if kind == "hang" else self.fast_ports[n % FAST_PORTS]
            request_id = f"{prefix}{kind}-{n:06d}"
            kinds[request_id] = kind
            async with sem:
                await store.create(
                    request_id,
                    callback_url=f"http://127.0.0.1:{port}/hook/{n}",
                    reference_id=None,
                    first_poll_in=0.01,
                    trace=f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
                    if self.traced
                    else None,
                )

        await asyncio.gather(
            *(one(n, "fast") for n in range(fast)), *(one(n, "hang") for n in range(hanging))
        )
        await client.aclose()
        return kinds

    async def polled_all(self, ids: list[str]) -> bool:
        client = aioredis.Redis.from_url(self.redis_url)
        async with client.pipeline(transaction=False) as pipe:
            for request_id in ids:
                pipe.hexists(keys.job(request_id), "polled")
            values = await pipe.execute()
        await client.aclose()
        return all(values)

    def scenario(
        self, env: dict[str, str], fast: int, hanging: int, hang: float
    ) -> tuple[float, float]:
        """Run one burst; returns the worker's CPU seconds per ended job: its event loop's
        thread's, and its other threads' (a traced worker's exporter)."""
        httpx.post(self.receivers + "/reset")
        httpx.post(self.upstream + "/reset")
        kinds = asyncio.run(self.create_jobs(fast, hanging))
        ids = list(kinds)
        if not self.per_id:
            httpx.post(self.upstream + "/register", json=ids, timeout=30)
        from relay.jobs.events import webhook_id

        event_ids = {webhook_id(rid, "lipsync.completed"): rid for rid in ids}
        with worker(env, free_port()) as proc:
            deadline = time.monotonic() + 60
            while not asyncio.run(self.polled_all(ids)):
                if time.monotonic() > deadline:
                    raise RuntimeError("the worker did not poll every job within 60 s")
                time.sleep(0.2)
            calls_before = httpx.get(self.upstream + "/polls").json()
            time.sleep(2.0)  # a few rounds of polling: the steady state before the burst
            calls = httpx.get(self.upstream + "/polls").json()
            poll_rate = (calls["polls"] - calls_before["polls"]) / 2
            list_rate = (calls["lists"] - calls_before["lists"]) / 2
            rss_before = rss_kib(proc.pid)
            profiler = None
            self.runs += 1
            if self.profile:
                profiler = subprocess.Popen(
                    [
                        "py-spy",
                        "record",
                        "-p",
                        str(proc.pid),
                        "-d",
                        "10",
                        "-r",
                        "200",
                        "--nonblocking",  # sampled without pausing the worker
                        "-f",
                        "raw",
                        "-o",
                        f"{self.profile}.{self.runs}{self.name.replace(' ', '.')}",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(1)
            if self.start_line is not None:
                self.start_line.wait(timeout=120)
            cpu_before = thread_cpu_seconds(proc.pid)
            finish = httpx.post(self.upstream + "/finish").json()["at"]
            deadline = time.monotonic() + 120
            while True:
                stats = httpx.get(self.receivers + "/stats", timeout=30).json()
                got = stats["received"]
                if len(got) >= len(ids) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            rss_after = rss_kib(proc.pid)
            if self.traced:
                time.sleep(1.0)  # the last spans' export counts too (and the same idle second)
            cpu_after = thread_cpu_seconds(proc.pid)
            loop_cpu = cpu_after[0] - cpu_before[0]
            other_cpu = cpu_after[1] - cpu_before[1]
            cpu_burst = loop_cpu + other_cpu
            if profiler is not None:
                profiler.wait()
        ended = asyncio.run(ended_at(self.redis_url, ids))
        fast_times = {
            event_ids[eid]: t for eid, t in got.items() if kinds[event_ids[eid]] == "fast"
        }
        hang_done = sum(1 for eid in got if kinds[event_ids[eid]] == "hang")
        label = f"{fast} fast + {hanging} hanging ({hang:g} s)" if hanging else f"{fast} fast"
        print(f"\n== {label}: one worker{f' ({self.name.strip()})' if self.name else ''} ==")
        print(f"fast callbacks received: {len(fast_times)}/{fast}; hanging: {hang_done}/{hanging}")
        print(
            f"upstream calls before the finish: {poll_rate:,.0f} per-id polls/s, "
            f"{list_rate:,.1f} list pages/s"
        )
        cpu_per_job = (loop_cpu / len(ids), other_cpu / len(ids))
        if not fast_times:
            return cpu_per_job
        since_finish = [t - finish for t in fast_times.values()]
        drain = max(since_finish)
        print(
            f"from the finish:   drain {drain:.2f} s, {len(fast_times) / drain:,.0f} callbacks/s, "
            f"p50 {pct(since_finish, 0.5):.2f} s, p99 {pct(since_finish, 0.99):.2f} s"
        )
        first_end = min(ended.values())
        since_end = [fast_times[r] - ended[r] for r in fast_times if r in ended]
        last_end = max(ended[r] for r in fast_times if r in ended)
        span = max(fast_times.values()) - first_end
        print(
            f"from each end seen: p50 {pct(since_end, 0.5):.3f} s, p99 {pct(since_end, 0.99):.3f} s"
            f", max {max(since_end):.3f} s; ends seen over {last_end - first_end:.2f} s, "
            f"first end to last fast callback {span:.2f} s ({len(fast_times) / span:,.0f}/s)"
        )
        if hanging:
            print(f"hanging receivers in flight at once (max): {stats['hang_max_in_flight']}")
        print(f"worker RSS: {rss_before / 1024:.1f} MiB before, {rss_after / 1024:.1f} MiB after")
        # Steadier than rates when other work shares the cores: what one ended job costs.
        print(
            f"worker CPU from the finish to the last callback: {cpu_burst:.2f} s, "
            f"{cpu_burst / len(ids) * 1000:.3f} ms per job (final poll + callback; threads "
            f"other than the event loop's: {other_cpu / len(ids) * 1000:.3f} ms)"
        )
        print(f"median end-to-callback: {statistics.median(since_end) * 1000:.0f} ms")
        return cpu_per_job


def traced_env(env: dict[str, str], sink: str) -> dict[str, str]:
    """`env` with the worker's tracing on, exporting to the OTLP receiver at `sink`."""
    # Batches go out within 250 ms, so the burst's last one is in the CPU measured.
    return {**env, "OTEL_EXPORTER_OTLP_ENDPOINT": sink, "OTEL_BSP_SCHEDULE_DELAY": "250"}


def tracing_rounds(benches: list[Bench], args: argparse.Namespace) -> None:
    """The worker's CPU per ended job with tracing off and on, in turns, or (with two
    benches) at once, on a bench each."""
    sink_port = free_port()
    sink = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "otlp_sink.py"), str(sink_port)],
        stdout=subprocess.DEVNULL,
    )
    sink_url = f"http://127.0.0.1:{sink_port}"
    try:
        wait_http(sink_url + "/count")
        envs = {}
        for bench in benches:
            bench.traced = True
            env = worker_env(bench.upstream, bench.redis_url, args.hang, args.env)
            envs[id(bench)] = {"off": env, "on": traced_env(env, sink_url)}
        cpu: dict[str, list[float]] = {"off": [], "on": []}
        loop: dict[str, list[float]] = {"off": [], "on": []}

        def run(bench: Bench, name: str) -> None:
            on_loop, elsewhere = bench.scenario(envs[id(bench)][name], args.jobs, 0, args.hang)
            cpu[name].append(on_loop + elsewhere)
            loop[name].append(on_loop)

        for n in range(1, args.rounds + 1):
            # Each way first (or on the first bench) in every other round: whatever the first
            # run of a pair (or a bench) has for it falls on both alike.
            names = ["off", "on"] if n % 2 else ["on", "off"]
            if len(benches) == 1:
                for name in names:
                    print(f"\n-- round {n}, tracing {name} --")
                    run(benches[0], name)
                continue
            print(f"\n-- round {n}, tracing {names[0]} and {names[1]} at once --")
            start_line = threading.Barrier(2)
            for bench, name in zip(benches, names, strict=True):
                bench.start_line = start_line
                bench.name = f" tracing {name}"
            with ThreadPoolExecutor(2) as pool:
                for done in [pool.submit(run, b, m) for b, m in zip(benches, names, strict=True)]:
                    done.result()
        off, on = statistics.median(cpu["off"]), statistics.median(cpu["on"])
        # Each round's pair ran back to back (or at once): steadier than the medians' ratio
        # when other work comes and goes on the machine.
        ratios = [a / b for a, b in zip(cpu["on"], cpu["off"], strict=True)]
        paired = statistics.median(ratios)
        got = httpx.get(sink_url + "/count").json()
        spans = got["spans"]
        print(
            f"\nworker CPU per ended job (median of {args.rounds}): tracing off "
            f"{off * 1000:.2f} ms, on {on * 1000:.2f} ms, on/off = {on / off:.2f}, median of "
            f"the rounds' on/off {paired:.2f} (target <= 1.15); per round: off "
            + ", ".join(f"{c * 1000:.2f}" for c in cpu["off"])
            + "; on "
            + ", ".join(f"{c * 1000:.2f}" for c in cpu["on"])
        )
        if len(ratios) > 2:
            mean, sd = statistics.mean(ratios), statistics.stdev(ratios)
            # About 95 % of such means fall within two standard errors of the true ratio.
            margin = 2 * sd / len(ratios) ** 0.5
            print(
                f"the rounds' on/off: mean {mean:.3f} ± {margin:.3f} (two standard errors; "
                f"sd {sd:.3f}), from {min(ratios):.2f} to {max(ratios):.2f}"
            )
        # Where tracing's cost is: the spans made on the loop, and the exporter's thread.
        loop_off, loop_on = statistics.median(loop["off"]), statistics.median(loop["on"])
        print(
            f"of which the event loop's thread: off {loop_off * 1000:.3f} ms, on "
            f"{loop_on * 1000:.3f} ms ({(loop_on - loop_off) * 1e6:+.0f} µs); other threads, "
            f"on: {(on - loop_on) * 1e6:.0f} µs (medians)"
        )
        jobs = args.rounds * args.jobs
        print(
            f"OTLP receiver: {spans:,} spans in {got['exports']:,} exports from the traced "
            f"rounds' {jobs:,} jobs: {got['names']}"
        )
    finally:
        sink.terminate()
        sink.wait()


async def all_polled(redis_url: str, ids: list[str]) -> bool:
    client = aioredis.Redis.from_url(redis_url)
    async with client.pipeline(transaction=False) as pipe:
        for request_id in ids:
            pipe.hexists(keys.job(request_id), "polled")
        values = await pipe.execute()
    await client.aclose()
    return all(values)


def live_scenario(args: argparse.Namespace, upstream: live.Upstream) -> None:
    every = max(1, round(args.jobs / args.hanging)) if args.hanging else 0
    extra = dict(item.split("=", 1) for item in args.env)
    print(f"\n== live burst: {args.jobs:,} jobs, {upstream.describe()} ==")
    print(f"   {live.load()} at the start", flush=True)
    with (
        tempfile.TemporaryDirectory(prefix="burst-live-") as logs,
        embedded_redis() as redis_url,
        live.sandbox(upstream) as sandbox_url,
        live.receivers(fast=FAST_PORTS, hanging=1, hang=args.hang) as rx,
        live.relay(redis_url, sandbox_url, Path(logs), **extra) as relay,
    ):

        def callback_url(n: int) -> str:
            hangs = every and n % every == every - 1
            return rx.hanging[0] if hangs else rx.fast[n % FAST_PORTS]

        done = live.Callers(relay.api, callback_url).start(args.jobs).join()
        hanging_ids = {rid for n, rid in enumerate(done.ids) if callback_url(n) == rx.hanging[0]}
        print(
            f"  submitted {len(done.ids):,} in {done.last - done.first:.0f} s "
            f"({done.refused} 429s waited out, {len(done.errors)} errors)",
            flush=True,
        )
        deadline = time.monotonic() + 120
        while not asyncio.run(all_polled(redis_url, done.ids)):
            if time.monotonic() > deadline:
                raise RuntimeError("the relay did not see every job within 120 s")
            time.sleep(0.5)
        flood = live.Callers(relay.api, lambda n: rx.fast[0]).start(None) if args.flood else None
        time.sleep(3.0)  # the steady state, submissions and all
        cpu_before = relay.cpu()
        finish = httpx.post(sandbox_url + "/_sandbox/finish", json={"ids": done.ids}).json()["at"]
        fast_ids = set(done.ids) - hanging_ids
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            arrived, duplicates = rx.stats()
            if fast_ids <= arrived.keys():
                break
            time.sleep(0.2)
        cpu_after = relay.cpu()
        flooded = flood.stop() if flood else None
        time.sleep(args.hang + 2 if hanging_ids else 0)
        arrived, duplicates = rx.stats()
        hanging_at_once = rx.hanging_at_once()
        ended = asyncio.run(ended_at(redis_url, done.ids))
        early = relay.worker_log.read_text().count("sweep ended early")
        outcomes = live.sweep_outcomes(relay.metrics())
        load_end = live.load()
    fast = [arrived[rid] - finish for rid in fast_ids if rid in arrived]
    offset = time.time() - time.monotonic()
    seen = [ended[rid] - offset - finish for rid in done.ids if rid in ended]
    print(
        f"  fast callbacks: {len(fast):,}/{len(fast_ids):,}; hanging: "
        f"{len(hanging_ids & arrived.keys())}/{len(hanging_ids)} (at most {hanging_at_once} at "
        f"once); duplicates: {duplicates}"
        + (f"; submitted during the burst: {len(flooded.ids)}" if flooded else "")
    )
    if fast:
        within = sum(1 for lag in fast if lag <= 3.0)
        print(
            f"  from the finish: last fast callback {max(fast):.2f} s (target 3 s), "
            f"{len(fast) / max(fast):,.0f}/s, p50 {live.pct(fast, 0.5):.2f} s, "
            f"p99 {live.pct(fast, 0.99):.2f} s; within 3 s: {within:,}"
        )
    print(f"  ends seen by the relay after the finish: {live.spread(seen)}")
    print(f"  sweeps by outcome: {outcomes}; 'sweep ended early' log lines: {early}")
    api_cpu, worker_cpu = (b - a for a, b in zip(cpu_before, cpu_after, strict=True))
    print(
        f"  CPU from the finish to the last fast callback: worker {worker_cpu:.1f} s, "
        f"API {api_cpu:.1f} s; {load_end} at the end"
    )


@contextmanager
def stand_ins(hang: float) -> Iterator[Bench]:
    """The stand-in upstream and the receivers (hanging ones: `hang` seconds), each in a process
    of its own, and a redis-server: a Bench on them."""
    upstream_port, control_port, hang_port = free_port(), free_port(), free_port()
    fast_ports = [free_port(avoid=(upstream_port, control_port, hang_port)) for _ in range(4)]
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=run_upstream, args=(upstream_port,), daemon=True),
        ctx.Process(
            target=run_receivers, args=(control_port, fast_ports, hang_port, hang), daemon=True
        ),
    ]
    for proc in procs:
        proc.start()
    upstream = f"http://127.0.0.1:{upstream_port}"
    receivers = f"http://127.0.0.1:{control_port}"
    try:
        wait_http(receivers + "/stats")
        wait_http(upstream + "/api/v1/lipsync/requests/x")
        with embedded_redis(avoid=(upstream_port, control_port, hang_port, *fast_ports)) as url:
            yield Bench(url, upstream, receivers, fast_ports, hang_port)
    finally:
        for proc in procs:
            proc.terminate()
            proc.join()


def worker_env(upstream: str, redis_url: str, hang: float, extra: list[str]) -> dict[str, str]:
    """The bench's worker settings: this machine's environment without RELAY_* and OTEL_*
    (tracing is on only where a bench sets it), pointed at the stand-in upstream (`upstream`:
    its root URL) with the budget out of the way, polling every POLL_INTERVAL seconds,
    delivering to loopback receivers; `extra`: VAR=value."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "OTEL_"))}
    env.update(
        {
            "CHAMELAION_BASE_URL": upstream + "/api",
            "CHAMELAION_API_KEY": "bench-key",
            "RELAY_REDIS_URL": redis_url,
            "RELAY_WEBHOOK_SECRETS": "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "RELAY_UPSTREAM_RATE_LIMIT": "1000000",
            "RELAY_POLL_MIN_INTERVAL": POLL_INTERVAL,
            "RELAY_POLL_MAX_INTERVAL": POLL_INTERVAL,
            "RELAY_CALLBACK_ALLOWED_NETWORKS": "127.0.0.0/8",
            # Receivers listen on free loopback ports, outside the default port list.
            "RELAY_CALLBACK_ALLOWED_PORTS": "1-65535",
            "RELAY_DELIVERY_TIMEOUT": str(hang + 5),
            "RELAY_LOG_FORMAT": "json",
            **dict(item.split("=", 1) for item in extra),
        }
    )
    return env


def main(args: argparse.Namespace) -> None:
    if args.live:
        for name in args.orders.split(","):
            live_scenario(args, live.Upstream(order=cast(ListOrder, name), queued=86_400.0))
        return
    with stand_ins(args.hang) as bench:
        bench.profile = args.profile
        bench.per_id = args.per_id
        if args.tracing:
            with ExitStack() as more:
                # A second bench, so that both ways run at once.
                other = [more.enter_context(stand_ins(args.hang))] if args.together else []
                for another in other:
                    another.per_id, another.profile = args.per_id, args.profile
                tracing_rounds([bench, *other], args)
            return
        env = worker_env(bench.upstream, bench.redis_url, args.hang, args.env)
        fast = args.jobs - args.hanging
        bench.scenario(env, fast, args.hanging, args.hang)
        bench.scenario(env, fast, 0, args.hang)
        if args.memory:
            bench.scenario(env, args.memory, 0, args.hang)
    print(json.dumps({"note": "2-core machine shared with other work: figures are noisy"}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--hanging", type=int, default=100)
    parser.add_argument("--hang", type=float, default=10.0)
    parser.add_argument("--memory", type=int, default=0, help="callbacks in a memory run")
    parser.add_argument(
        "--profile",
        default="",
        help="py-spy the worker (raw stacks) to here.N (N: the scenario's number)",
    )
    parser.add_argument(
        "--per-id", action="store_true", help="no list endpoint: every status from a per-id GET"
    )
    parser.add_argument("--env", action="append", default=[], help="extra VAR=value for workers")
    parser.add_argument("--live", action="store_true", help="the issue #19 case (see above)")
    parser.add_argument("--tracing", action="store_true", help="tracing off vs on (see above)")
    parser.add_argument("--rounds", type=int, default=3, help="with --tracing")
    parser.add_argument(
        "--together", action="store_true", help="with --tracing: both ways at once (see above)"
    )
    parser.add_argument("--orders", default="newest_first,oldest_first", help="with --live")
    parser.add_argument(
        "--flood", action="store_true", help="with --live: the callers go on submitting"
    )
    main(parser.parse_args())
