"""Chaos soak (issue #11): thousands of jobs through the relay while its parts are killed.

Run: uv run python bench/chaos.py [--jobs 5000] [--duration 300] [--settle 300]
                                  [--kill-every 20] [--seed N] [--env VAR=value ...]
Scaled down: uv run python bench/chaos.py --jobs 500 --duration 60 --settle 120

Everything is real and runs in a process of its own: a redis-server with AOF on
(`--appendonly yes`, in a directory of its own so it can be stopped and started again on the
same data and port), the sandbox upstream (jobs take 1 s queued then 4-14 s processing, so all
end during the run), `relay api`, two `relay worker`s, and the receivers (aiohttp, four ports)
that verify every callback with `standardwebhooks`. The relay runs with its defaults except
for loopback callbacks and a short delivery retry schedule (0, 2, 5, 10, 20, 40, 60, 120 s);
`--env` overrides any of it.

Submissions: `--jobs` over `--duration` seconds at an even pace, each through the official SDK
(AsyncChamelaion, its default retries on) with a reference_id of its own and a callback_url;
every second one also carries an `Idempotency-Key`; every 20th has a video URL the sandbox
fails (so its callback must be `lipsync.failed`). No submission is retried by the bench beyond
the SDK's own retries.

The chaos, during the submission window (times given for --duration 300, scaled with it):
- every --kill-every s (20) a worker is SIGKILLed and started again, the two in turn;
- at 30 % the API is SIGKILLed and started again on the same port;
- at 50 % Redis is stopped (SIGTERM, so AOF is flushed) and started again;
- at 75 % Redis is paused (SIGSTOP) for 10 s, then continued (SIGCONT);
- throughout, the sandbox answers 10 % of polls (per-id reads and list pages) 500, 5 % 429
  (Retry-After: 1), and 5 % of creates "created, then 500" (the job exists, the answer is lost);
- 10 % of callback destinations (one URL per job) answer 500 twice before taking it.

Then it waits for quiescence, at most --settle s: every acknowledged job called back and no
lost submission left to settle (no open intent: an errored submission's job may still be found
and tracked), or the relay idle for 10 s (nothing left to poll, no intent open, no delivery
pending, failing or queued). Printed:
what the chaos did; submissions acknowledged (the caller heard success) and errored, by kind;
upstream jobs created (the sandbox's count) and duplicates per reference_id; callbacks received
and verified; acknowledged jobs with no callback (lost), with the wrong event, or with more than
one distinct webhook-id for one event type; distinct webhook-ids per job; deliveries stranded in
the relay's Redis (pending with no queued or running arq attempt, as relay/delivery/stranded.py
finds them); how long it all took; and one PASS/FAIL line per target of the issue. The exit
code is 0 whatever the outcome. Process logs stay in the directory printed at the start.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import multiprocessing
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis
from aiohttp import web
from aioserve import post_app, serve_forever
from chamelaion import APIConnectionError, APIStatusError, AsyncChamelaion

from relay.devtools.embedded_redis import find_redis_server
from relay.devtools.ports import free_port
from relay.redis import keys

SANDBOX_KEY = "sandbox-key"
RELAY_KEY = "chaos-bench-key-0123456789"
RECEIVER_PORTS = 4
FAIL_EVERY = 20  # every 20th job is one the sandbox fails: 5 %
FLAKY_EVERY = 10  # every 10th destination answers 500 twice first: 10 %
FLAKY_FAILURES = 2
QUEUED_SECONDS, PROCESSING_SECONDS, PROCESSING_SPREAD = 1.0, 4.0, 10.0
SANDBOX_FAULTS = [
    {"status": 500, "rate": 0.10, "paths": "poll"},
    {"status": 429, "rate": 0.05, "retry_after": 1, "paths": "poll"},
    {"status": 500, "rate": 0.05, "paths": "generate", "when": "after"},
]
REDIS_PAUSE = 10.0
QUIET_FOR = 10.0  # seconds of an idle relay that end the wait for callbacks


# --- the sandbox and the receivers, each in a process of its own ---------------------------


def run_sandbox(port: int, seed: int | None) -> None:
    import uvicorn

    from relay.sandbox import SandboxConfig, create_sandbox_app

    config = SandboxConfig(
        api_keys=(SANDBOX_KEY,),
        queued_seconds=QUEUED_SECONDS,
        processing_seconds=PROCESSING_SECONDS,
        processing_spread=PROCESSING_SPREAD,
        seed=seed,
    )
    app = create_sandbox_app(config)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def run_receivers(control_port: int, ports: list[int], secret: str) -> None:
    """Verify each callback; answer 500 to a flaky destination's first two, else 204.

    A destination is one job's callback URL, `/hook/{n}/{failures}`. Every request is kept as
    [n, webhook-id, type, request id, verified, status answered].
    """
    from standardwebhooks import Webhook

    hook = Webhook(secret)
    receipts: list[list[Any]] = []
    tries: Counter[int] = Counter()
    taken: set[int] = set()

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        n, failures = int(request.match_info["n"]), int(request.match_info["failures"])
        try:
            hook.verify(body, dict(request.headers))
            verified = True
        except Exception:
            verified = False
        try:
            event = json.loads(body)
            type_, request_id = event.get("type"), (event.get("data") or {}).get("id")
        except (ValueError, AttributeError):
            type_, request_id = None, None
        tries[n] += 1
        status = 400 if not verified else 500 if tries[n] <= failures else 204
        if status == 204:
            taken.add(n)
        wid = request.headers.get("webhook-id", "")
        receipts.append([n, wid, type_, request_id, verified, status])
        return web.Response(status=status)

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"receipts": receipts})

    async def taken_list(request: web.Request) -> web.Response:
        return web.json_response(sorted(taken))

    control = web.Application()
    control.router.add_get("/stats", stats)
    control.router.add_get("/taken", taken_list)
    apps = [(post_app("/hook/{n}/{failures}", receive), port) for port in ports]
    asyncio.run(serve_forever([*apps, (control, control_port)]))


# --- the parts the chaos kills ---------------------------------------------------------------


def wait_http(url: str, timeout: float = 60) -> float:
    """Wait until `url` answers 200; returns the seconds it took."""
    started = time.monotonic()
    while time.monotonic() < started + timeout:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=1).status_code == 200:
                return time.monotonic() - started
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up within {timeout} s")


class RedisServer:
    """A redis-server with AOF on, in its own directory, that can be stopped and paused."""

    def __init__(self, workdir: Path, log: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> float:
        started = time.monotonic()
        argv = [find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
        argv += ["--dir", str(self.workdir), "--protected-mode", "yes"]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log)
        while time.monotonic() < started + 30:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return time.monotonic() - started
            time.sleep(0.02)
        raise RuntimeError("redis-server did not listen within 30 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            self.proc.terminate()
            self.proc.wait(timeout=60)

    def restart(self) -> float:
        """SIGTERM (AOF flushed), then start on the same directory and port."""
        started = time.monotonic()
        self.stop()
        self.start()
        return time.monotonic() - started

    def pause(self, seconds: float) -> float:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        time.sleep(seconds)
        self.proc.send_signal(signal.SIGCONT)
        return seconds


class RelayProcess:
    """`relay api` or `relay worker` as a subprocess that can be SIGKILLed and started again."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.args, self.env, self.log = name, args, env, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.health = ""

    def start(self) -> None:
        env = dict(self.env)
        if self.args == ["worker"]:
            port = free_port()  # a fresh one: the last may still be held by the killed process
            env["RELAY_WORKER_HTTP_PORT"] = str(port)
            self.health = f"http://127.0.0.1:{port}/healthz"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relay.cli", *self.args],
                env=env,
                stdout=log,
                stderr=log,
            )

    def kill_and_restart(self) -> float:
        """SIGKILL, start again; returns the seconds until it answers its health check."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.start()
        return wait_http(self.health)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- the run -------------------------------------------------------------------------------


@dataclass
class Submission:
    n: int
    reference_id: str
    idempotency_key: str | None
    expected: str  # the event its callback must carry
    flaky: bool
    request_id: str | None = None
    error: str | None = None
    seconds: float = 0.0


@dataclass
class ChaosLog:
    started: float
    notes: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, at: float, text: str) -> None:
        with self.lock:
            self.notes.append((at - self.started, text))

    @property
    def lines(self) -> list[str]:
        return [f"  {at:6.1f} s  {text}" for at, text in sorted(self.notes)]


def error_kind(exc: Exception) -> str:
    if isinstance(exc, APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        message = str(body.get("error", "")) or exc.message
        return f"{exc.status_code} {message[:90]}"
    if isinstance(exc, APIConnectionError):
        return type(exc).__name__
    return f"{type(exc).__name__}: {str(exc)[:90]}"


async def submit(
    client: AsyncChamelaion, sub: Submission, at: float, receiver_ports: list[int]
) -> None:
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    video = "https://cdn.example.com/fail-{n}.mp4" if sub.expected.endswith("failed") else ""
    video = (video or "https://cdn.example.com/{n}.mp4").format(n=sub.n)
    port = receiver_ports[sub.n % len(receiver_ports)]
    failures = FLAKY_FAILURES if sub.flaky else 0
    headers = {"Idempotency-Key": sub.idempotency_key} if sub.idempotency_key else None
    started = time.monotonic()
    try:
        job = await client.lipsync.generate(
            inputs=[
                {"type": "video", "url": video},
                {"type": "audio", "url": f"https://cdn.example.com/{sub.n}.wav"},
            ],
            reference_id=sub.reference_id,
            extra_body={"callback_url": f"http://127.0.0.1:{port}/hook/{sub.n}/{failures}"},
            extra_headers=headers,
        )
        sub.request_id = job.request_id
    except Exception as exc:
        sub.error = error_kind(exc)
    sub.seconds = time.monotonic() - started


def chaos_plan(
    args: argparse.Namespace, workers: list[RelayProcess], api: RelayProcess, redis: RedisServer
) -> list[tuple[float, str, Callable[[], float]]]:
    plan: list[tuple[float, str, Callable[[], float]]] = []
    at, turn = args.kill_every, 0
    while at < args.duration:
        worker = workers[turn % len(workers)]
        plan.append((at, f"SIGKILL {worker.name}, started again", worker.kill_and_restart))
        at, turn = at + args.kill_every, turn + 1
    plan.append((0.3 * args.duration, "SIGKILL the API, started again", api.kill_and_restart))
    plan.append((0.5 * args.duration, "Redis stopped (SIGTERM) and started again", redis.restart))
    pause_text = f"Redis paused (SIGSTOP) for {REDIS_PAUSE:g} s"
    plan.append((0.75 * args.duration, pause_text, lambda: redis.pause(REDIS_PAUSE)))
    return sorted(plan, key=lambda step: step[0])


async def run_chaos(
    plan: list[tuple[float, str, Callable[[], float]]], log: ChaosLog
) -> list[BaseException | None]:
    async def step(at: float, text: str, action: Callable[[], float]) -> None:
        await asyncio.sleep(max(0.0, log.started + at - time.monotonic()))
        began = time.monotonic()
        try:
            took = await asyncio.to_thread(action)
        except Exception as exc:
            log.note(began, f"{text}: FAILED ({exc})")
            raise
        log.note(began, f"{text} (done in {took:.1f} s)")

    results = await asyncio.gather(*(step(*s) for s in plan), return_exceptions=True)
    return [r if isinstance(r, BaseException) else None for r in results]


async def relay_idle(client: aioredis.Redis) -> bool:
    """Nothing to poll, no arq job, and no job whose delivery is pending (stranded or not:
    the relay's own sweep may still requeue a stranded one)."""
    if (
        await client.zcard(keys.POLLS)
        or await client.zcard(keys.ARQ_QUEUE)
        or await client.zcard(keys.INTENTS)
    ):
        return False
    filed = await client.zrange(keys.deliveries("pending"), 0, -1)
    filed += await client.zrange(keys.deliveries("failing"), 0, -1)
    async with client.pipeline(transaction=False) as pipe:
        for delivery_id in filed:
            pipe.hget(keys.job(delivery_id.decode()), "delivery")
        states = await pipe.execute()
    return b"pending" not in states


async def settle(
    redis_url: str, receivers: str, acknowledged: set[int], bound: float
) -> tuple[float, str]:
    """Wait until every acknowledged job was called back and every lost submission settled,
    or the relay is idle; at most `bound`."""
    started = time.monotonic()
    client = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    idle_since: float | None = None
    reason = f"gave up after {bound:g} s"
    async with httpx.AsyncClient(timeout=30) as http:
        while time.monotonic() < started + bound:
            taken = set((await http.get(receivers + "/taken")).json())
            try:
                open_intents = await client.zcard(keys.INTENTS)
            except aioredis.RedisError:
                open_intents = -1  # unknown: not settled yet
            if acknowledged <= taken and open_intents == 0:
                await asyncio.sleep(5)  # room for a late duplicate to show
                reason = "every acknowledged job was called back and no intent is open"
                break
            try:
                idle = await relay_idle(client)
            except aioredis.RedisError:
                idle = False
            now = time.monotonic()
            idle_since = (idle_since or now) if idle else None
            if idle_since is not None and now - idle_since >= QUIET_FOR:
                reason = f"the relay was idle for {QUIET_FOR:g} s"
                break
            await asyncio.sleep(1)
    await client.aclose()
    return time.monotonic() - started, reason


@dataclass
class RedisFindings:
    states: dict[str, int]  # jobs by their hash's `delivery` field
    index_out_of_step: dict[str, int]  # state index -> members whose job is in another state
    outstanding_polls: int
    stranded: list[str]
    waiting: int  # pending deliveries with an arq attempt queued or running
    requeued_by_sweep: int
    tracked: set[str]


async def inspect_redis(redis_url: str, upstream_ids: list[str]) -> RedisFindings:
    """What the relay's Redis holds once the run is over: the delivery states, and the pending
    deliveries whose awaited attempt has no arq job (queued, deferred or running)."""
    client = aioredis.Redis.from_url(redis_url, socket_timeout=30)
    index: dict[str, list[bytes]] = {}
    for state in ("pending", "failing", "delivered", "failed", "gone"):
        index[state] = await client.zrange(keys.deliveries(state), 0, -1)
    polls = await client.zcard(keys.POLLS)
    queued: set[str] = {m.decode() for m in await client.zrange(keys.ARQ_QUEUE, 0, -1)}
    async for key in client.scan_iter(match=keys.ARQ_JOB_PREFIX + "deliver:*", count=1000):
        queued.add(key.decode().removeprefix(keys.ARQ_JOB_PREFIX))
    async for key in client.scan_iter(match=keys.ARQ_IN_PROGRESS_PREFIX + "*", count=1000):
        queued.add(key.decode().removeprefix(keys.ARQ_IN_PROGRESS_PREFIX))
    # A postponed attempt (to a backed-off destination) is `deliver:{id}:{attempt}:{ms}`.
    awaited = {job_id.rsplit(":", 1)[0] if job_id.count(":") == 3 else job_id for job_id in queued}
    job_keys = [key async for key in client.scan_iter(match=keys.job("*"), count=1000)]
    async with client.pipeline(transaction=False) as pipe:
        for key in job_keys:
            pipe.hmget(key, "delivery", "attempt", "callback_url")
        rows = await pipe.execute()
    stranded, waiting = [], 0
    prefix = keys.job("")
    states: Counter[str] = Counter()
    delivery_of: dict[bytes, bytes | None] = {}
    for key, (delivery, attempt, callback_url) in zip(job_keys, rows, strict=True):
        request_id = key.decode().removeprefix(prefix)
        delivery_of[request_id.encode()] = delivery
        states[(delivery or b"none").decode()] += 1
        if delivery != b"pending" or not callback_url:
            continue
        if keys.delivery_job_id(request_id, int(attempt or 0)) in awaited:
            waiting += 1
        else:
            stranded.append(request_id)
    requeued = 0
    attempt_keys = [k async for k in client.scan_iter(match=keys.attempts("*"), count=1000)]
    async with client.pipeline(transaction=False) as pipe:
        for key in attempt_keys:
            pipe.lrange(key, 0, -1)
        for entries in await pipe.execute():
            requeued += sum(1 for entry in entries if b"stranded" in entry)
    async with client.pipeline(transaction=False) as pipe:
        for request_id in upstream_ids:
            pipe.exists(keys.job(request_id))
        exists = await pipe.execute()
    tracked = {rid for rid, found in zip(upstream_ids, exists, strict=True) if found}
    await client.aclose()
    # The index files "pending after a failed attempt" as failing; the job hash says pending.
    out_of_step = {
        state: sum(
            1
            for member in members
            if delivery_of.get(member) != (b"pending" if state == "failing" else state.encode())
        )
        for state, members in index.items()
    }
    return RedisFindings(dict(states), out_of_step, polls, stranded, waiting, requeued, tracked)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def verdict(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'FAIL'}  {text}"


def report(
    args: argparse.Namespace,
    subs: list[Submission],
    sandbox_stats: dict[str, Any],
    receipts: list[list[Any]],
    redis_findings: RedisFindings,
    chaos: ChaosLog,
    timing: dict[str, float],
    settle_reason: str,
) -> None:
    by_ref = {sub.reference_id: sub for sub in subs}
    acked = [sub for sub in subs if sub.request_id is not None]
    errored = [sub for sub in subs if sub.request_id is None]
    print(f"\n== chaos soak: {len(subs)} jobs over {args.duration:g} s, 2 workers ==")
    print("chaos (seconds from the first submission):")
    print("\n".join(chaos.lines))
    fired = sandbox_stats.get("faults_fired", {})
    print("sandbox faults fired: " + json.dumps(fired, sort_keys=True))

    print(f"\nsubmissions: {len(subs)}")
    print(f"  acknowledged (the caller heard success): {len(acked)}")
    print(f"  errored: {len(errored)}")
    for kind, count in Counter(sub.error for sub in errored).most_common():
        print(f"    {count:6d}  {kind}")
    seconds = [sub.seconds for sub in acked]
    print(
        f"  submit time, acknowledged: p50 {pct(seconds, 0.5):.2f} s, "
        f"p99 {pct(seconds, 0.99):.2f} s, max {max(seconds, default=0):.2f} s"
    )

    created_by_ref: dict[str, list[str]] = {
        ref: ids for ref, ids in sandbox_stats["created_by_reference"].items() if ref in by_ref
    }
    upstream_ids = [rid for ids in created_by_ref.values() for rid in ids]
    dup_refs = {ref: ids for ref, ids in created_by_ref.items() if len(ids) > 1}
    extra = sum(len(ids) - 1 for ids in dup_refs.values())
    with_key = sum(1 for ref in dup_refs if by_ref[ref].idempotency_key)
    dup_acked = sum(1 for ref in dup_refs if by_ref[ref].request_id is not None)
    print(f"\nupstream jobs created: {sandbox_stats['created']} (for {len(created_by_ref)} refs)")
    print(
        f"  duplicate upstream jobs: {extra} beyond the first, over {len(dup_refs)} reference_ids"
        f" ({with_key} with an Idempotency-Key too; {dup_acked} of acknowledged submissions)"
    )
    per_ref = Counter(len(ids) for ids in created_by_ref.values())
    per_ref[0] = len(by_ref) - len(created_by_ref)
    print(
        "  upstream jobs per reference_id: "
        + ", ".join(f"{jobs}: {refs}" for jobs, refs in sorted(per_ref.items()))
    )
    untracked = [rid for rid in upstream_ids if rid not in redis_findings.tracked]
    print(f"  upstream jobs the relay does not track (orphans): {len(untracked)}")
    errored_upstream = [sub for sub in errored if sub.reference_id in created_by_ref]
    errored_tracked = sum(
        1
        for sub in errored_upstream
        if any(rid in redis_findings.tracked for rid in created_by_ref[sub.reference_id])
    )
    print(
        f"  errored submissions whose job exists upstream: {len(errored_upstream)} "
        f"(tracked by the relay all the same: {errored_tracked})"
    )
    acked_untracked = sum(1 for sub in acked if sub.request_id not in redis_findings.tracked)
    print(f"  acknowledged jobs the relay does not track: {acked_untracked}")

    verified = [r for r in receipts if r[4]]
    print(f"\ncallbacks received: {len(receipts)}; verified with standardwebhooks: {len(verified)}")
    print(
        f"  answered 500 on purpose (destinations failing twice first): "
        f"{sum(1 for r in receipts if r[5] == 500)}"
    )
    taken: dict[int, list[list[Any]]] = defaultdict(list)
    for receipt in verified:
        if receipt[5] == 204:
            taken[receipt[0]].append(receipt)
    lost, wrong, doubled, foreign, redelivered = [], [], [], 0, 0
    ids_per_job: Counter[int] = Counter()
    for sub in acked:
        got = taken.get(sub.n, [])
        distinct: dict[str, set[str]] = defaultdict(set)
        for _, wid, type_, request_id, _, _ in got:
            distinct[type_].add(wid)
            foreign += request_id != sub.request_id
        redelivered += len(got) - sum(len(ids) for ids in distinct.values())
        ids_per_job[sum(len(ids) for ids in distinct.values())] += 1
        if not got:
            lost.append(sub)
        elif sub.expected not in distinct:
            wrong.append(sub)
        if any(len(ids) > 1 for ids in distinct.values()):
            doubled.append(sub)
    errored_called = sum(1 for sub in errored if sub.n in taken)
    print(f"  acknowledged jobs called back (taken by the receiver): {len(acked) - len(lost)}")
    print(f"  lost (acknowledged, never called back): {len(lost)}")
    print(f"  wrong event (e.g. completed upstream, called back failed): {len(wrong)}")
    print(f"  jobs with more than one distinct webhook-id for one event type: {len(doubled)}")
    print(f"  callbacks taken about an upstream job the caller never heard of: {foreign}")
    print(f"  callbacks taken again with the same webhook-id (allowed): {redelivered}")
    print(f"  errored submissions called back all the same: {errored_called}")
    print(
        "  distinct webhook-ids per acknowledged job: "
        + ", ".join(f"{count}: {jobs}" for count, jobs in sorted(ids_per_job.items()))
    )
    if lost:
        print(
            "  lost, first few: " + ", ".join(f"{s.reference_id}={s.request_id}" for s in lost[:5])
        )

    states = ", ".join(f"{state} {count}" for state, count in redis_findings.states.items())
    print(
        f"\nrelay's Redis at the end: jobs by delivery state: {states}; polls outstanding "
        f"{redis_findings.outstanding_polls}"
    )
    out_of_step = ", ".join(
        f"{state} {count}" for state, count in redis_findings.index_out_of_step.items() if count
    )
    print(f"  delivery state index entries out of step with their job: {out_of_step or 0}")
    print(f"  pending deliveries waiting on a queued attempt: {redis_findings.waiting}")
    print(
        f"  stranded deliveries (pending, no queued or running attempt): "
        f"{len(redis_findings.stranded)}"
    )
    if redis_findings.stranded:
        print("  stranded, first few: " + ", ".join(redis_findings.stranded[:5]))
    print(
        f"  attempts requeued by the relay's stranded-delivery sweep: "
        f"{redis_findings.requeued_by_sweep}"
    )

    print(
        f"\ntime: {timing['total']:.0f} s in all; submissions {timing['submit']:.0f} s; "
        f"settling {timing['settle']:.0f} s ({settle_reason})"
    )
    print()
    print(
        verdict(
            not lost and not doubled,
            f"0 lost: {len(lost)} acknowledged jobs never called back, {len(doubled)} called back "
            "under more than one webhook-id",
        )
    )
    print(
        verdict(
            not dup_refs,
            f"0 duplicate upstream jobs: {extra} over {len(dup_refs)} reference_ids",
        )
    )
    print(
        verdict(
            not redis_findings.stranded,
            f"0 stranded deliveries: {len(redis_findings.stranded)}",
        )
    )
    print(json.dumps({"note": "2-core machine shared with other work: figures are noisy"}))


@contextlib.contextmanager
def spawned(target: Callable[..., None], *args: Any) -> Iterator[None]:
    proc = multiprocessing.get_context("spawn").Process(target=target, args=args, daemon=True)
    proc.start()
    try:
        yield
    finally:
        proc.terminate()
        proc.join()


def relay_env(redis_url: str, sandbox: str, secret: str, api_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "CHAMELAION_"))}
    env.update(
        {
            "CHAMELAION_BASE_URL": sandbox + "/api",
            "CHAMELAION_API_KEY": SANDBOX_KEY,
            "RELAY_REDIS_URL": redis_url,
            "RELAY_API_KEYS": RELAY_KEY,
            "RELAY_API_PORT": str(api_port),
            "RELAY_WEBHOOK_SECRETS": secret,
            "RELAY_CALLBACK_ALLOWED_NETWORKS": "127.0.0.0/8",
            "RELAY_CALLBACK_ALLOWED_PORTS": "1-65535",
            "RELAY_DELIVERY_RETRY_SCHEDULE": "0,2,5,10,20,40,60,120",
            "RELAY_LOG_FORMAT": "json",
            "RELAY_SHUTDOWN_TIMEOUT": "5",
            # Sized for the load, as a deployment would be: the shared budget counts the API's
            # creates too (~17/s here) besides polls; the default (10/s) is for a smaller one.
            "RELAY_UPSTREAM_RATE_LIMIT": "100",
        }
    )
    return env


async def load(
    args: argparse.Namespace,
    subs: list[Submission],
    api_url: str,
    receiver_ports: list[int],
    plan: list[tuple[float, str, Callable[[], float]]],
    chaos: ChaosLog,
) -> None:
    """The submissions at an even pace, and the chaos beside them."""
    pace = args.duration / max(1, args.jobs)
    async with AsyncChamelaion(api_key=RELAY_KEY, base_url=api_url + "/api") as sdk:
        chaos_task = asyncio.create_task(run_chaos(plan, chaos))
        await asyncio.gather(
            *(submit(sdk, sub, chaos.started + sub.n * pace, receiver_ports) for sub in subs)
        )
        await chaos_task


def soak(args: argparse.Namespace, logs: Path, redis: RedisServer) -> None:
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    sandbox_port, control_port, api_port = free_port(), free_port(), free_port()
    receiver_ports = [free_port() for _ in range(RECEIVER_PORTS)]
    sandbox = f"http://127.0.0.1:{sandbox_port}"
    receivers = f"http://127.0.0.1:{control_port}"
    env = relay_env(redis.url, sandbox, secret, api_port)
    env.update(dict(item.split("=", 1) for item in args.env))
    api_url = f"http://127.0.0.1:{api_port}"
    api = RelayProcess("the API", ["api", "--port", str(api_port)], env, logs / "api.log")
    api.health = api_url + "/healthz"
    workers = [
        RelayProcess(f"worker {i + 1}", ["worker"], env, logs / f"worker-{i + 1}.log")
        for i in range(2)
    ]
    with (
        spawned(run_sandbox, sandbox_port, args.seed),
        spawned(run_receivers, control_port, receiver_ports, secret),
    ):
        wait_http(sandbox + "/api/health")
        wait_http(receivers + "/taken")
        for fault in SANDBOX_FAULTS:
            httpx.post(sandbox + "/_sandbox/faults", json=fault).raise_for_status()
        for proc in (api, *workers):
            proc.start()
        try:
            for proc in (api, *workers):
                wait_http(proc.health)
            run_id = secrets.token_hex(3)
            subs = [
                Submission(
                    n=n,
                    reference_id=f"chaos-{run_id}-{n}",
                    idempotency_key=f"chaos-{run_id}-{n}" if n % 2 == 0 else None,
                    expected="lipsync.failed" if n % FAIL_EVERY == 7 else "lipsync.completed",
                    flaky=n % FLAKY_EVERY == 3,
                )
                for n in range(args.jobs)
            ]
            print(f"submitting {args.jobs} jobs over {args.duration:g} s", flush=True)
            chaos = ChaosLog(time.monotonic())
            plan = chaos_plan(args, workers, api, redis)
            asyncio.run(load(args, subs, api_url, receiver_ports, plan, chaos))
            submitted = time.monotonic()
            print(f"submissions done in {submitted - chaos.started:.0f} s; settling", flush=True)
            acknowledged = {sub.n for sub in subs if sub.request_id is not None}
            settle_s, reason = asyncio.run(settle(redis.url, receivers, acknowledged, args.settle))
            done = time.monotonic()
            sandbox_stats = httpx.get(sandbox + "/_sandbox/stats", timeout=60).json()
            receipts = httpx.get(receivers + "/stats", timeout=60).json()["receipts"]
            upstream_ids = [
                rid
                for ref, ids in sandbox_stats["created_by_reference"].items()
                if ref.startswith(f"chaos-{run_id}-")
                for rid in ids
            ]
            findings = asyncio.run(inspect_redis(redis.url, upstream_ids))
            timing = {
                "total": done - chaos.started,
                "submit": submitted - chaos.started,
                "settle": settle_s,
            }
            report(args, subs, sandbox_stats, receipts, findings, chaos, timing, reason)
        finally:
            for proc in (*workers, api):
                proc.stop()


def main(args: argparse.Namespace) -> None:
    logs = Path(args.logs or tempfile.mkdtemp(prefix="relay-chaos-"))
    logs.mkdir(parents=True, exist_ok=True)
    print(f"logs: {logs}", flush=True)
    with tempfile.TemporaryDirectory(prefix="relay-chaos-redis-") as workdir:
        redis = RedisServer(Path(workdir), logs / "redis.log")
        redis.start()
        try:
            soak(args, logs, redis)
        finally:
            redis.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--duration", type=float, default=300.0, help="submission window, s")
    parser.add_argument("--settle", type=float, default=300.0, help="longest wait after it, s")
    parser.add_argument("--kill-every", type=float, default=20.0, help="s between worker kills")
    parser.add_argument("--seed", type=int, default=None, help="seeds the sandbox's faults")
    parser.add_argument("--logs", default="", help="directory for the processes' logs")
    parser.add_argument("--env", action="append", default=[], help="extra VAR=value for the relay")
    main(parser.parse_args())
