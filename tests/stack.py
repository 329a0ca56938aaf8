"""A whole relay on loopback for end-to-end tests.

Real parts only: the sandbox upstream and the relay API under uvicorn in threads, workers, a real
redis-server, and a receiver that records every callback and answers with scripted statuses.

A worker runs in the test's process by default (`InProcessWorker`: `relay worker`'s own
`serve_worker` on an event loop of its own, in a thread), as arq's own tests run a worker: it
is up in milliseconds, where a `relay worker` process spends a second or more importing on a
loaded machine, and a test of timing then races nothing but the relay. Tests that need a process
boundary (a SIGKILL, a signal, a worker's own clock or its log, metrics of one worker alone)
ask for `relay worker` subprocesses: `relay_stack(..., processes=True)`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import io
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import redis
import uvloop
from chamelaion import Chamelaion
from prometheus_client import generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from relay.api.app import create_app
from relay.devtools.ports import free_port
from relay.redis import keys
from relay.sandbox import SandboxConfig, create_sandbox_app
from relay.serving import api_options
from relay.settings import Settings, load_settings
from relay.worker.process import serve_worker
from tests.servers import servers, url_of

SANDBOX_KEY = "sandbox-key"
RELAY_KEY = "relay-test-key-0123456789"


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass
class Callback:
    headers: dict[str, str]
    body: bytes
    at: float
    # How many callbacks the receiver had answered when this one came: the order of events,
    # where comparing times would race the machine's load.
    answered_before: int = 0


@dataclass
class Receiver:
    """Records callbacks; answers each with the next scripted status (then `default`)."""

    script: list[int] = field(default_factory=list)
    default: int = 200
    delay: float = 0.0
    extra_headers: dict[str, str] = field(default_factory=dict)
    # What the answer to a callback with each status says (none when not given).
    answers: dict[int, bytes] = field(default_factory=dict)
    received: list[Callback] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    in_flight: int = 0
    max_in_flight: int = 0
    answered: int = 0

    def app(self) -> Starlette:
        async def hook(request: Request) -> Response:
            import asyncio

            body = await request.body()
            with self.lock:
                self.received.append(
                    Callback(dict(request.headers), body, time.monotonic(), self.answered)
                )
                status = self.script.pop(0) if self.script else self.default
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                if self.delay:
                    await asyncio.sleep(self.delay)
            finally:
                with self.lock:
                    self.in_flight -= 1
                    self.answered += 1
            return Response(
                self.answers.get(status), status_code=status, headers=self.extra_headers
            )

        return Starlette(routes=[Route("/hook", hook, methods=["POST"])])

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Callback]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.received) >= count:
                    return list(self.received)
            time.sleep(0.02)
        raise AssertionError(f"expected {count} callbacks, got {len(self.received)}")


class InProcessWorker:
    """A worker in the test's process: `serve_worker`, as `relay worker` runs it, on a uvloop
    event loop in a thread of its own, with its health port on `port`. `stop()` does what
    SIGTERM does to `relay worker`: the worker drains and stops in its shutdown order."""

    def __init__(self, settings: Settings, port: int) -> None:
        self.settings = settings
        self.port = port
        self.error: BaseException | None = None
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name=f"worker:{port}", daemon=True)
        self._thread.start()
        self._started.wait()

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._started.set()
            await serve_worker(self.settings, self._stop, http_port=self.port)

        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(main())
        except BaseException as exc:
            self.error = exc
        finally:
            self._started.set()

    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 30) -> None:
        """Stop as on SIGTERM and wait; raises what the worker failed with, if it did."""
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # its loop has closed already
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(
                f"the in-process worker did not stop within {timeout} s; where it is:\n"
                + self._where()
            )
        if self.error is not None:
            raise AssertionError("the in-process worker failed") from self.error

    def _where(self) -> str:
        """The loop thread's stack and each of its tasks' (what a worker that will not stop is
        waiting on). Read from another thread while the loop runs: good enough for a failure."""
        out = io.StringIO()
        frame = sys._current_frames().get(self._thread.ident or 0)
        if frame is not None:
            out.write("-- the loop's thread\n" + "".join(traceback.format_stack(frame)))
        if self._loop is not None:
            for task in list(asyncio.all_tasks(self._loop)):
                out.write(f"-- {task!r}\n")
                with contextlib.suppress(Exception):
                    out.write("".join(f"   {where}\n" for where in _awaiting(task.get_coro())))
        return out.getvalue()


def _awaiting(coro: object) -> list[str]:
    """Where a suspended coroutine waits, outermost first, through every coroutine and async
    generator it awaits (a task's own stack shows only its outermost frame)."""
    found = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        if frame is not None:
            found.append(f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
    return found


Worker = subprocess.Popen[bytes] | InProcessWorker


@dataclass
class Stack:
    api_url: str
    sandbox_url: str
    receiver: Receiver
    callback_url: str
    env: dict[str, str]
    webhook_secrets: list[str]
    log_dir: Path
    processes: bool = False
    # This process's metrics when the stack started: an in-process worker shares its counters
    # with every stack this process ran before (see worker_metrics).
    metrics_before: str = ""
    workers: list[Worker] = field(default_factory=list)
    worker_urls: list[str] = field(default_factory=list)
    # The stderr of each `relay worker` process (in-process workers log to the test's output).
    worker_logs: list[Path] = field(default_factory=list)
    stopped: list[Worker] = field(default_factory=list)

    def sdk(self) -> Chamelaion:
        return Chamelaion(api_key=RELAY_KEY, base_url=self.api_url + "/api", max_retries=0)

    def upstream(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Talk to the sandbox directly, as the relay would (control paths need no key)."""
        return httpx.request(
            method, self.sandbox_url + path, headers={"x-api-key": SANDBOX_KEY}, **kwargs
        )

    def stop_worker(self, worker: Worker, sig: signal.Signals = signal.SIGTERM) -> int:
        """Signal a worker and wait for it; returns its exit code. An in-process worker can only
        be stopped as SIGTERM stops one (0 when it stopped cleanly)."""
        self.stopped.append(worker)
        if isinstance(worker, InProcessWorker):
            if sig not in (signal.SIGTERM, signal.SIGINT):
                raise TypeError(f"{sig.name} needs a worker process: relay_stack(processes=True)")
            worker.stop()
            return 0
        worker.send_signal(sig)
        return worker.wait(timeout=30)

    def start_worker(self, **env: str) -> Worker:
        """One more worker, with `env` over the stack's; a `relay worker` process when the stack
        runs them, or when `env` sets what only a process can have (a fake clock)."""
        port = free_port()
        worker: Worker
        if self.processes or "LD_PRELOAD" in env:
            log_path = self.log_dir / f"worker-{len(self.workers)}.log"
            self.worker_logs.append(log_path)
            with log_path.open("wb") as log_file:
                worker = subprocess.Popen(
                    [sys.executable, "-m", "relay.cli", "worker"],
                    env={**self.env, "RELAY_WORKER_HTTP_PORT": str(port), **env},
                    stderr=log_file,
                )
        else:
            worker = InProcessWorker(relay_settings({**self.env, **env}), port)
        self.workers.append(worker)
        self.worker_urls.append(f"http://127.0.0.1:{port}")
        return worker

    def worker_metrics(self, index: int = 0) -> str:
        """A worker's /metrics, its counters counting this stack alone: an in-process worker
        shares them with the API and with the stacks this process ran earlier, so what they
        held at the stack's start is taken off (gauges are as served). With two workers in
        the process, its counters are theirs together: per-worker counts need processes."""
        text = httpx.get(self.worker_urls[index] + "/metrics").text
        if isinstance(self.workers[index], InProcessWorker):
            return counted_since(text, self.metrics_before)
        return text

    def running_workers(self) -> list[Worker]:
        return [worker for worker in self.workers if worker not in self.stopped]

    def show_worker_logs(self) -> None:
        """Each worker process's stderr (its tail) to the test's output, which pytest shows when
        the test fails."""
        for path in self.worker_logs:
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace")
                print(f"--- {path.name} (its last 20,000 characters) ---", file=sys.stderr)
                print(text[-20_000:], file=sys.stderr)


def counted_since(text: str, before: str) -> str:
    """A Prometheus exposition with each counter's and histogram's samples less their value in
    `before` (an earlier exposition of the same process); every other line as it is."""

    def counted(exposition: str) -> Iterator[tuple[str, str | None]]:
        """Each line, and the series it gives a count of (None for any other line)."""
        kind = ""
        for line in exposition.splitlines():
            if line.startswith("# TYPE "):
                kind = line.split()[-1]
            series = line.rpartition(" ")[0]
            is_count = kind in ("counter", "histogram", "summary") and not line.startswith("#")
            created = series.split("{")[0].endswith("_created")
            yield line, series if is_count and not created else None

    earlier = {s: float(line.rpartition(" ")[2]) for line, s in counted(before) if s}
    lines = [
        line
        if series is None
        else f"{series} {float(line.rpartition(' ')[2]) - earlier.get(series, 0.0)!r}"
        for line, series in counted(text)
    ]
    return "\n".join(lines) + "\n"


def relay_settings(env: Mapping[str, str]) -> Settings:
    """The settings a relay process would load from `env`."""
    return load_settings(
        **{k: v for k, v in env.items() if k.startswith(("RELAY_", "CHAMELAION_"))}
    )


def relay_env(redis_url: str, sandbox_url: str, webhook_secrets: list[str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "CHAMELAION_"))}
    return {
        **env,
        "CHAMELAION_BASE_URL": sandbox_url + "/api",
        "CHAMELAION_API_KEY": SANDBOX_KEY,
        "RELAY_REDIS_URL": redis_url,
        "RELAY_API_KEYS": RELAY_KEY,
        "RELAY_WEBHOOK_SECRETS": ",".join(webhook_secrets),
        "RELAY_POLL_MIN_INTERVAL": "0.2",
        "RELAY_POLL_MAX_INTERVAL": "1",
        "RELAY_DELIVERY_RETRY_SCHEDULE": "0,0.3,0.3,0.3",
        "RELAY_DELIVERY_TIMEOUT": "2",
        "RELAY_UPSTREAM_RATE_LIMIT": "100",
        "RELAY_CALLBACK_ALLOWED_NETWORKS": "127.0.0.0/8",
        "RELAY_CALLBACK_ALLOWED_PORTS": "1-65535",
        "RELAY_LOG_FORMAT": "json",
        "RELAY_SHUTDOWN_TIMEOUT": "5",
    }


@contextlib.contextmanager
def relay_stack(
    redis_url: str,
    *,
    receiver: Receiver | None = None,
    sandbox: SandboxConfig | None = None,
    workers: int = 1,
    processes: bool = False,
    env: dict[str, str] | None = None,
    log_dir: Path | None = None,
) -> Iterator[Stack]:
    """The whole relay. Its workers run in this process, or as `relay worker` processes
    (`processes`), whose stderr goes to `log_dir` (kept) or to a directory removed afterwards,
    and to the test's output when the test fails."""
    receiver = receiver or Receiver()
    sandbox = sandbox or SandboxConfig(
        api_keys=(SANDBOX_KEY,), queued_seconds=0.3, processing_seconds=0.5
    )
    secrets_ = [new_secret(), new_secret()]
    # The servers stop together once the workers have stopped.
    with servers() as start, tempfile.TemporaryDirectory(prefix="relay-logs-") as own_logs:
        sandbox_url = url_of(start(create_sandbox_app(sandbox)))
        receiver_url = url_of(start(receiver.app()))
        full_env = {**relay_env(redis_url, sandbox_url, secrets_), **(env or {})}
        settings = relay_settings(full_env)
        api_url = url_of(start(create_app(settings), **api_options(settings)))
        stack = Stack(
            api_url,
            sandbox_url,
            receiver,
            receiver_url + "/hook",
            full_env,
            secrets_,
            log_dir or Path(own_logs),
            processes,
            generate_latest().decode(),
        )
        try:
            for _ in range(workers):
                stack.start_worker()
            # Up before the test starts: on a loaded machine a worker process may take
            # seconds to import, and a test of timing (a status window, a lease) must not
            # race that.
            for worker, url in zip(stack.workers, stack.worker_urls, strict=True):
                if isinstance(worker, InProcessWorker):
                    eventually(functools.partial(is_up, url))
                else:
                    serving(worker, url)
            yield stack
            # Workers the test did not stop must still be up, and must stop cleanly.
            died = [w for w in stack.running_workers() if not worker_running(w)]
            assert not died, f"a worker died during the test: {died}"
            stop_cleanly(stack)
        except BaseException:
            stack.show_worker_logs()
            raise
        finally:
            for worker in stack.workers:
                if isinstance(worker, InProcessWorker):
                    with contextlib.suppress(AssertionError):
                        worker.stop()
                elif worker.poll() is None:
                    worker.kill()
                    worker.wait()


def worker_running(worker: Worker) -> bool:
    if isinstance(worker, InProcessWorker):
        return worker.running()
    return worker.poll() is None


def stop_cleanly(stack: Stack) -> None:
    """Stop the workers still running as SIGTERM does; each must stop cleanly."""
    running = stack.running_workers()
    for worker in running:
        if isinstance(worker, InProcessWorker):
            worker.stop()
        else:
            # One started late may still be importing: SIGTERM then is no clean stop.
            serving(worker, stack.worker_urls[stack.workers.index(worker)])
            worker.send_signal(signal.SIGTERM)
    codes = [w.wait(timeout=30) for w in running if isinstance(w, subprocess.Popen)]
    assert codes == [0] * len(codes), f"workers stopped with {codes}"


def is_up(base_url: str) -> bool:
    return httpx.get(base_url + "/healthz").status_code == 200


# How long a relay process may take to start answering /healthz: it bounds a hang, not a race
# (a cold start imports for seconds of CPU, which a machine loaded tenfold stretches tenfold).
START_TIMEOUT = 60.0


def serving(proc: subprocess.Popen[bytes], base_url: str) -> None:
    """Wait until the process `proc` answers /healthz at `base_url`; should it exit first, fail
    at once with its exit code (its stderr is in the test's output)."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        code = proc.poll()
        if code is not None:
            raise AssertionError(f"{proc.args!r} exited with {code} before it answered /healthz")
        with contextlib.suppress(httpx.TransportError):
            if is_up(base_url):
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"{proc.args!r} did not answer /healthz in {START_TIMEOUT} s")
        time.sleep(0.05)


def eventually(check: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Retry `check` until it returns a truthy value; fail with its last error or value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (AssertionError, httpx.TransportError) as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s: {last!r}")


def job_fields(redis_url: str, request_id: str) -> dict[bytes, bytes]:
    """The stored hash of a tracked job (empty when untracked)."""
    client = redis.Redis.from_url(redis_url)
    try:
        return cast(dict[bytes, bytes], client.hgetall(keys.job(request_id)))
    finally:
        client.close()


def job_field(redis_url: str, request_id: str, name: str) -> bytes | None:
    return job_fields(redis_url, request_id).get(name.encode())
