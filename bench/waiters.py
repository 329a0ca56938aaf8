"""Thousands of `Prefer: wait` requests on one API process: how soon they hear their job's end,
what they cost in memory, and that they make no upstream call.

Run: uv run python bench/waiters.py [--waiters 5000] [--wait 60]

Starts a real redis-server, the sandbox upstream (`relay sandbox`) and the API (`relay api`,
no worker) as separate processes, submits one job, and opens `--waiters` connections, each a
`GET /api/v1/lipsync/requests/{id}` with `Prefer: wait=N` (a bare asyncio protocol on uvloop
that stamps each answer's last byte, so the client's own cost stays small). Once the API
reports them all waiting (`relay_api_waiting`), the bench ends the job itself with the relay's
own end script (what a worker does when a poll sees the end), and times every answer from
that moment to its last byte at the client. The API's RSS is read before the connections
open (after a warm-up of plain reads) and while they all wait; the sandbox's call counts
before and after say how many upstream calls the waits made. The API's connection caps are
raised to hold the waiters (they do not count against RELAY_HTTP_MAX_CONCURRENCY, left at its
default). Client, API, Redis and
sandbox share the machine's cores: the latency is a ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import re
import signal
import statistics
import sys
import time
from typing import cast

import httpx
import orjson
import uvloop
from forward import rss_mib, start

from relay.devtools.embedded_redis import embedded_redis
from relay.devtools.ports import free_port
from relay.jobs.events import build_event, webhook_id
from relay.jobs.store import JobStore
from relay.redis.conn import connect

KEY = "bench-key-0123456789"
BODY = {
    "inputs": [
        {"type": "video", "url": "https://cdn.example.com/v.mp4"},
        {"type": "audio", "url": "https://cdn.example.com/a.wav"},
    ]
}
BATCH = 250  # connections opened at once (the listen backlog is finite)


def waiting(api: str) -> int:
    text = httpx.get(api + "/metrics").text
    match = re.search(r'^relay_api_waiting\{kind="wait"\} ([\d.e+]+)$', text, re.MULTILINE)
    return int(float(match.group(1))) if match else 0


def upstream_calls(sandbox: str) -> int:
    calls: dict[str, int] = httpx.get(sandbox + "/_sandbox/stats").json()["calls"]
    return sum(calls.values())


class Waiter(asyncio.Protocol):
    """One waiting request on its own connection: the moment its answer's last byte arrives.

    A bare protocol rather than asyncio streams: the client shares the machine's cores with the
    API, and what it spends on each answer delays the next ones it reads."""

    def __init__(self, request: bytes, answered: asyncio.Future[tuple[float, bytes]]) -> None:
        self.request = request
        self.answered = answered
        self.received = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.received += data
        end = self.received.find(b"\r\n\r\n")
        if end < 0:
            return
        match = re.search(rb"content-length: (\d+)", self.received[:end], re.IGNORECASE)
        if match is None or len(self.received) >= end + 4 + int(match.group(1)):
            self.answered.set_result((time.monotonic(), self.received))
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answered.done():
            self.answered.set_exception(ConnectionError("closed before the answer"))


def checked(received: bytes) -> int:
    """The answer's status, negative unless it is a 200 with the job completed."""
    head, _, body = received.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status if status == 200 and orjson.loads(body).get("status") == "completed" else -status


async def run(
    api_port: int, api: str, sandbox: str, redis_url: str, args: argparse.Namespace
) -> None:
    api_pid = args.api_pid
    async with httpx.AsyncClient(headers={"x-api-key": KEY}) as client:
        created = await client.post(api + "/api/v1/lipsync/generate", json=BODY)
        request_id = created.json()["request_id"]
        path = f"/api/v1/lipsync/requests/{request_id}"
        # Warm-up: the code paths every waiter takes, minus the wait.
        for _ in range(200):
            await client.get(api + path, headers={"prefer": "wait=0"})
    before_rss = rss_mib(api_pid)
    before_calls = upstream_calls(sandbox)
    loop = asyncio.get_running_loop()
    request = (
        f"GET {path} HTTP/1.1\r\nhost: bench\r\nx-api-key: {KEY}\r\n"
        f"prefer: wait={args.wait}\r\n\r\n"
    ).encode()
    answers: list[asyncio.Future[tuple[float, bytes]]] = []
    for start_at in range(0, args.waiters, BATCH):
        batch = [loop.create_future() for _ in range(min(BATCH, args.waiters - start_at))]
        await asyncio.gather(
            *(
                loop.create_connection(
                    functools.partial(Waiter, request, answered), "127.0.0.1", api_port
                )
                for answered in batch
            )
        )
        answers += batch
    deadline = time.monotonic() + 60
    while (held := await asyncio.to_thread(waiting, api)) < args.waiters:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {held} of {args.waiters} waiters registered")
        await asyncio.sleep(0.2)
    waiting_rss = rss_mib(api_pid)
    redis = connect(redis_url, timeout=5)
    store = JobStore(redis)
    job = await store.get(request_id)
    assert job is not None
    data = {
        "id": request_id,
        "status": "completed",
        "created_at": "2026-12-06T00:00:00Z",
        "output_url": "https://cdn.example.com/out.mp4",
    }
    ended_at = time.monotonic()
    await store.end(
        job,
        status="completed",
        body=orjson.dumps(data),
        event_id=webhook_id(request_id, "lipsync.completed"),
        event=build_event("lipsync.completed", data),
        retention=3600,
        deliver=False,
    )
    results = await asyncio.gather(*answers)
    await redis.aclose()
    lags = sorted(done - ended_at for done, _ in results)
    bad = [status for _, received in results if (status := checked(received)) != 200]
    extra_calls = upstream_calls(sandbox) - before_calls
    after_rss = rss_mib(api_pid)
    print(f"waiters: {args.waiters} on one job, Prefer: wait={args.wait}, one API process")
    print(
        f"answered after the end: p50 {statistics.median(lags) * 1000:.0f} ms, "
        f"p99 {lags[int(len(lags) * 0.99) - 1] * 1000:.0f} ms, max {lags[-1] * 1000:.0f} ms "
        f"(target: all within 200 ms); not 200 + completed: {len(bad)}"
    )
    growth = waiting_rss - before_rss
    print(
        f"API RSS: {before_rss:.1f} MiB before, {waiting_rss:.1f} MiB with all waiting "
        f"(+{growth:.1f} MiB, {growth * 1024 / args.waiters:.1f} KiB each; target < 50 MiB), "
        f"{after_rss:.1f} MiB after"
    )
    print(f"upstream calls while they waited and answered: {extra_calls} (target 0)")


def main(args: argparse.Namespace) -> None:
    sandbox_port, api_port = free_port(), free_port()
    with embedded_redis(avoid=(sandbox_port, api_port)) as redis_url:
        sandbox = f"http://127.0.0.1:{sandbox_port}"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RELAY_")},
            "CHAMELAION_BASE_URL": sandbox + "/api",
            "CHAMELAION_API_KEY": "sandbox-key",
            "RELAY_REDIS_URL": redis_url,
            "RELAY_API_KEYS": KEY,
            "RELAY_LOG_FORMAT": "json",
            "RELAY_UPSTREAM_RATE_LIMIT": "1000",
            # Every waiter holds a connection, all from one peer.
            "RELAY_HTTP_MAX_CONNECTIONS": str(args.waiters + 100),
            "RELAY_HTTP_MAX_CONNECTIONS_PER_PEER": str(args.waiters + 100),
        }
        cli = [sys.executable, "-m", "relay.cli"]
        procs = [
            start(
                [*cli, "sandbox", "--port", str(sandbox_port)],
                env,
                sandbox + "/api/health",
                within=30,
            )
        ]
        try:
            api = f"http://127.0.0.1:{api_port}"
            api_cmd = [*cli, "api", "--port", str(api_port)]
            procs.append(start(api_cmd, env, api + "/healthz", within=30))
            args.api_pid = procs[1].pid
            uvloop.run(run(api_port, api, sandbox, redis_url, args))
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--waiters", type=int, default=5000)
    parser.add_argument("--wait", type=int, default=60)
    main(parser.parse_args())
