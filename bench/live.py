"""The live case the sweep and burst benches share: a relay in production shape on a busy account.

- the sandbox upstream in a process of its own, as Chamelaion would be: 150 ms on the network
  per call, at most 100 rows a page, 20 calls/s (429 beyond), 20,000 older requests from before
  the relay started, whole-second `created_at` (as Chamelaion's own examples write it);
- `relay api` and one `relay worker` as subprocesses, at the default settings (upstream budget
  10 calls/s, sweeps every second);
- callers that submit through the relay's API with the official SDK (its default retries,
  which honour Retry-After; a 429 that outlasts them is waited out and tried again), so the
  API spends the shared budget as it does in production, while earlier jobs finish;
- receivers in a process of their own (aiohttp) that note when each callback arrived, on the
  machine's monotonic clock, which the sandbox's finish times are also on.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import chamelaion
import httpx
import orjson
import redis
import uvicorn
from aiohttp import web
from aioserve import post_app, serve_forever

from relay.devtools.ports import free_port
from relay.sandbox import SandboxConfig, create_sandbox_app
from relay.sandbox.state import ListOrder, TimePrecision

SANDBOX_KEY = "sandbox-key"
RELAY_KEY = "bench-relay-key-0123456789"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
LIST_ROUTE = "GET /v1/lipsync/requests"
POLL_ROUTE = "GET /v1/lipsync/requests/{id}"
CREATE_ROUTE = "POST /v1/lipsync/generate"
VIDEO = "https://cdn.example.com/clip.mp4"
AUDIO = "https://cdn.example.com/voice.wav"


@dataclass(frozen=True)
class Upstream:
    """The issue's conditions, each a knob."""

    order: ListOrder = "newest_first"
    precision: TimePrecision = "seconds"
    latency: float = 0.15
    page_cap: int = 100
    rate: float = 20.0
    history: int = 20_000
    queued: float = 0.5
    processing: float = 1.5
    spread: float = 4.0  # each job takes processing + up to this much more

    def config(self) -> SandboxConfig:
        return SandboxConfig(
            api_keys=(SANDBOX_KEY,),
            list_order=self.order,
            time_precision=self.precision,
            latency=self.latency,
            list_max_limit=self.page_cap,
            rate_limit_per_second=self.rate,
            history=self.history,
            queued_seconds=self.queued,
            processing_seconds=self.processing,
            processing_spread=self.spread,
        )

    def describe(self) -> str:
        return (
            f"{self.order}, {self.precision} created_at, {self.latency * 1000:.0f} ms a call, "
            f"<= {self.page_cap} rows a page, {self.rate:g} calls/s cap, {self.history:,} history"
        )


def _run_sandbox(port: int, config: SandboxConfig) -> None:
    uvicorn.run(create_sandbox_app(config), host="127.0.0.1", port=port, log_level="warning")


def wait_up(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=1).status_code < 500:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


@contextlib.contextmanager
def sandbox(upstream: Upstream) -> Iterator[str]:
    port = free_port()
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_run_sandbox, args=(port, upstream.config()), daemon=True)
    proc.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_up(url + "/api/health")
        yield url
    finally:
        proc.terminate()
        proc.join()


def _run_receivers(control_port: int, ports: list[tuple[str, int]], hang: float) -> None:
    """Receivers on (host, port): a host named 127.0.0.2 hangs `hang` s before answering."""
    arrived: dict[str, float] = {}
    duplicates = [0]
    hanging = {"now": 0, "max": 0}

    def handler(hangs: bool) -> Callable[[web.Request], Any]:
        async def hook(request: web.Request) -> web.Response:
            body = await request.read()
            if hangs:
                hanging["now"] += 1
                hanging["max"] = max(hanging["max"], hanging["now"])
                try:
                    await asyncio.sleep(hang)
                finally:
                    hanging["now"] -= 1
            request_id = orjson.loads(body)["data"]["id"]
            if request_id in arrived:
                duplicates[0] += 1
            arrived.setdefault(request_id, time.monotonic())
            return web.Response(status=204)

        return hook

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(
            {"arrived": arrived, "duplicates": duplicates[0], "hanging_at_once": hanging["max"]}
        )

    async def serve() -> None:
        control = web.Application()
        control.router.add_get("/stats", stats)
        runners = []
        for host, port in ports:
            runner = web.AppRunner(post_app("/hook", handler(host != "127.0.0.1")), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, host, port, backlog=4096).start()
            runners.append(runner)
        await serve_forever([(control, control_port)])

    asyncio.run(serve())


@dataclass
class Receivers:
    control: str
    fast: list[str]
    hanging: list[str]

    def stats(self) -> tuple[dict[str, float], int]:
        body = httpx.get(self.control + "/stats", timeout=30).json()
        return body["arrived"], body["duplicates"]

    def hanging_at_once(self) -> int:
        """The most callbacks the hanging receivers held at once."""
        most: int = httpx.get(self.control + "/stats", timeout=30).json()["hanging_at_once"]
        return most


@contextlib.contextmanager
def receivers(fast: int = 4, hanging: int = 1, hang: float = 10.0) -> Iterator[Receivers]:
    """Fast receivers on 127.0.0.1; hanging ones on a host of their own, 127.0.0.2."""
    control = free_port()
    ports = [("127.0.0.1", free_port(avoid=(control,))) for _ in range(fast)]
    ports += [("127.0.0.2", free_port(avoid=(control,))) for _ in range(hanging)]
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_run_receivers, args=(control, ports, hang), daemon=True)
    proc.start()
    try:
        wait_up(f"http://127.0.0.1:{control}/stats")
        urls = [f"http://{host}:{port}/hook" for host, port in ports]
        yield Receivers(f"http://127.0.0.1:{control}", urls[:fast], urls[fast:])
    finally:
        proc.terminate()
        proc.join()


def relay_env(redis_url: str, sandbox_url: str, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "CHAMELAION_"))}
    return {
        **env,
        "CHAMELAION_BASE_URL": sandbox_url + "/api",
        "CHAMELAION_API_KEY": SANDBOX_KEY,
        "RELAY_REDIS_URL": redis_url,
        "RELAY_API_KEYS": RELAY_KEY,
        "RELAY_WEBHOOK_SECRETS": SECRET,
        "RELAY_CALLBACK_ALLOWED_NETWORKS": "127.0.0.0/8",
        # Receivers listen on free loopback ports, outside the default port list.
        "RELAY_CALLBACK_ALLOWED_PORTS": "1-65535",
        "RELAY_LOG_FORMAT": "json",
        **extra,
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Relay:
    api: str
    worker: str
    api_proc: subprocess.Popen[bytes]
    worker_proc: subprocess.Popen[bytes]
    worker_log: Path

    def metrics(self) -> dict[str, float]:
        """The worker's /metrics samples, by their full name with labels."""
        text = httpx.get(self.worker + "/metrics", timeout=30).text
        samples: dict[str, float] = {}
        for line in text.splitlines():
            match = re.match(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", line)
            if match:
                samples[match.group(1)] = float(match.group(2))
        return samples

    def cpu(self) -> tuple[float, float]:
        return cpu_seconds(self.api_proc.pid), cpu_seconds(self.worker_proc.pid)


@contextlib.contextmanager
def relay(redis_url: str, sandbox_url: str, log_dir: Path, **extra: str) -> Iterator[Relay]:
    env = relay_env(redis_url, sandbox_url, extra)
    api_port, worker_port = free_port(), free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    worker_log = log_dir / "worker.log"
    with (log_dir / "api.log").open("wb") as api_log, worker_log.open("wb") as worker_out:
        api = subprocess.Popen(
            [sys.executable, "-m", "relay.cli", "api", "--port", str(api_port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=api_log,
        )
        worker = subprocess.Popen(
            [sys.executable, "-m", "relay.cli", "worker"],
            env={**env, "RELAY_WORKER_HTTP_PORT": str(worker_port)},
            stdout=subprocess.DEVNULL,
            stderr=worker_out,
        )
    try:
        wait_up(f"http://127.0.0.1:{api_port}/healthz")
        wait_up(f"http://127.0.0.1:{worker_port}/healthz")
        yield Relay(
            f"http://127.0.0.1:{api_port}",
            f"http://127.0.0.1:{worker_port}",
            api,
            worker,
            worker_log,
        )
    finally:
        for proc in (api, worker):
            proc.send_signal(signal.SIGTERM)
        for proc in (api, worker):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


@dataclass
class Submitted:
    ids: list[str] = field(default_factory=list)
    refused: int = 0  # 429s that outlasted the SDK's retries, waited out and tried again
    errors: list[str] = field(default_factory=list)
    first: float = 0.0
    last: float = 0.0


class Callers:
    """`callers` threads, each with its own SDK client, submitting until told to stop or until
    `count` jobs are in (None: until stopped)."""

    def __init__(
        self,
        api_url: str,
        callback_urls: Callable[[int], str],
        callers: int = 8,
        *,
        key: str = RELAY_KEY,
    ):
        self.api_url = api_url
        self.key = key
        self.callback_urls = callback_urls
        self.callers = callers
        self.done = Submitted()
        self._lock = threading.Lock()
        self._next = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self, count: int | None) -> Callers:
        self.done.first = time.monotonic()
        for _ in range(self.callers):
            thread = threading.Thread(target=self._call, args=(count,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> Submitted:
        self._stop.set()
        return self.join()

    def join(self) -> Submitted:
        for thread in self._threads:
            thread.join()
        return self.done

    def _take(self, count: int | None) -> int | None:
        with self._lock:
            if self._stop.is_set() or (count is not None and self._next >= count):
                return None
            self._next += 1
            return self._next - 1

    def _call(self, count: int | None) -> None:
        client = chamelaion.Chamelaion(api_key=self.key, base_url=self.api_url + "/api")
        while (n := self._take(count)) is not None:
            while not self._stop.is_set():
                try:
                    result = client.lipsync.generate(
                        inputs=[{"type": "video", "url": VIDEO}, {"type": "audio", "url": AUDIO}],
                        extra_body={"callback_url": self.callback_urls(n)},
                    )
                except chamelaion.RateLimitError as exc:
                    with self._lock:
                        self.done.refused += 1
                    time.sleep(float(exc.response.headers.get("retry-after", "1")))
                    continue
                except chamelaion.APIError as exc:
                    with self._lock:
                        self.done.errors.append(type(exc).__name__)
                    break
                with self._lock:
                    self.done.ids.append(result.request_id)
                    self.done.last = time.monotonic()
                break
        client.close()


class BudgetSampler:
    """How far ahead of now the shared upstream budget is booked (its GCRA's theoretical arrival
    time minus Redis's clock), sampled every `every` s: a call booked now waits about that long.
    The keys are the relay's budget keys matching `relay:upstream:tat*` at the time."""

    def __init__(self, redis_url: str, every: float = 0.1) -> None:
        self.redis_url = redis_url
        self.every = every
        self.samples: dict[str, list[tuple[float, float]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> BudgetSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        client = redis.Redis.from_url(self.redis_url)
        try:
            while not self._stop.wait(self.every):
                names = sorted(client.scan_iter(match="relay:upstream:tat*"))
                if not names:
                    continue
                seconds, micros = cast(tuple[int, int], client.time())
                now = seconds + micros / 1e6
                values = cast(list[bytes | None], client.mget(names))
                at = time.monotonic()
                for name, value in zip(names, values, strict=True):
                    ahead = max(0.0, float(value) - now) if value else 0.0
                    self.samples.setdefault(name.decode(), []).append((at, ahead))
        finally:
            client.close()

    def between(self, start: float, end: float) -> dict[str, list[float]]:
        return {
            name: [ahead for at, ahead in samples if start <= at <= end]
            for name, samples in self.samples.items()
        }


def sandbox_stats(sandbox_url: str) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(sandbox_url + "/_sandbox/stats", timeout=30).json()
    return stats


def finishes(sandbox_url: str) -> dict[str, float]:
    got: dict[str, float] = httpx.get(sandbox_url + "/_sandbox/finishes", timeout=30).json()
    return got


def pct(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))] if ordered else float("nan")


def spread(values: list[float]) -> str:
    if not values:
        return "none"
    return f"p50 {pct(values, 0.5):.2f} s, p99 {pct(values, 0.99):.2f} s, max {max(values):.2f} s"


def load() -> str:
    return "load " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def sweep_outcomes(samples: dict[str, float]) -> dict[str, float]:
    return {
        m.group(1): value
        for name, value in samples.items()
        if (m := re.fullmatch(r'relay_sweeps_total\{outcome="([a-z_]+)"\}', name))
    }
