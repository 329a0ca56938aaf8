"""A whole relay on loopback for end-to-end tests.

Real parts only: the sandbox upstream and the relay API under uvicorn in threads, `relay worker`
as real subprocesses (so they can be SIGKILLed), a real redis-server, and a receiver that
records every callback and answers with scripted statuses.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import redis
from chamelaion import Chamelaion
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from relay.api.app import create_app
from relay.devtools.embedded_redis import free_port
from relay.redis import keys
from relay.sandbox import SandboxConfig, create_sandbox_app
from relay.serving import api_options
from relay.settings import load_settings
from tests.servers import serve

SANDBOX_KEY = "sandbox-key"
RELAY_KEY = "relay-test-key-0123456789"


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass
class Callback:
    headers: dict[str, str]
    body: bytes
    at: float


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
                self.received.append(Callback(dict(request.headers), body, time.monotonic()))
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


@dataclass
class Stack:
    api_url: str
    sandbox_url: str
    receiver: Receiver
    callback_url: str
    env: dict[str, str]
    webhook_secrets: list[str]
    log_dir: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    worker_urls: list[str] = field(default_factory=list)
    worker_logs: list[Path] = field(default_factory=list)
    stopped: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def sdk(self) -> Chamelaion:
        return Chamelaion(api_key=RELAY_KEY, base_url=self.api_url + "/api", max_retries=0)

    def upstream(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Talk to the sandbox directly, as the relay would (control paths need no key)."""
        return httpx.request(
            method, self.sandbox_url + path, headers={"x-api-key": SANDBOX_KEY}, **kwargs
        )

    def stop_worker(self, proc: subprocess.Popen[bytes], sig: signal.Signals) -> int:
        """Signal a worker and wait for it; returns its exit code."""
        self.stopped.append(proc)
        proc.send_signal(sig)
        return proc.wait(timeout=30)

    def start_worker(self, **env: str) -> subprocess.Popen[bytes]:
        port = free_port()
        log_path = self.log_dir / f"worker-{len(self.workers)}.log"
        self.worker_logs.append(log_path)
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "relay.cli", "worker"],
                env={**self.env, "RELAY_WORKER_HTTP_PORT": str(port), **env},
                stderr=log_file,
            )
        self.workers.append(proc)
        self.worker_urls.append(f"http://127.0.0.1:{port}")
        return proc


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
    env: dict[str, str] | None = None,
    log_dir: Path | None = None,
) -> Iterator[Stack]:
    """The whole relay; worker logs go to `log_dir` (kept) or a directory removed afterwards."""
    receiver = receiver or Receiver()
    sandbox = sandbox or SandboxConfig(
        api_keys=(SANDBOX_KEY,), queued_seconds=0.3, processing_seconds=0.5
    )
    secrets_ = [new_secret(), new_secret()]
    with serve(create_sandbox_app(sandbox)) as sandbox_url, serve(receiver.app()) as receiver_url:
        full_env = {**relay_env(redis_url, sandbox_url, secrets_), **(env or {})}
        settings = load_settings(
            **{k: v for k, v in full_env.items() if k.startswith(("RELAY_", "CHAMELAION_"))}
        )
        with (
            serve(create_app(settings), **api_options(settings)) as api_url,
            tempfile.TemporaryDirectory(prefix="relay-logs-") as own_logs,
        ):
            stack = Stack(
                api_url,
                sandbox_url,
                receiver,
                receiver_url + "/hook",
                full_env,
                secrets_,
                log_dir or Path(own_logs),
            )
            for _ in range(workers):
                stack.start_worker()
            try:
                # Up before the test starts: on a loaded machine a worker may take seconds to
                # import, and a test of timing (a status window, a lease) must not race that.
                for url in stack.worker_urls:
                    eventually(functools.partial(is_up, url), timeout=60)
                yield stack
                # Workers the test did not stop must still be up, and must stop cleanly.
                running = [p for p in stack.workers if p not in stack.stopped]
                died = [p.returncode for p in running if p.poll() is not None]
                assert not died, f"a worker died during the test (exit codes {died})"
                for proc in running:
                    # One started late may still be importing: SIGTERM then is no clean stop.
                    eventually(
                        functools.partial(is_up, stack.worker_urls[stack.workers.index(proc)])
                    )
                    proc.send_signal(signal.SIGTERM)
                codes = [proc.wait(timeout=30) for proc in running]
                assert codes == [0] * len(running), f"workers stopped with {codes}"
            finally:
                for proc in stack.workers:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()


def is_up(base_url: str) -> bool:
    return httpx.get(base_url + "/healthz").status_code == 200


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
