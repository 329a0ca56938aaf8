"""What many test files share, beside the stack (tests/stack.py) and the servers (tests/servers.py):
submitting through a stack and verifying its callbacks, steering the sandbox, the relay's own API,
signing in to the console, a worker's parts built in the test's process, a lone API, and
multipart upload bodies.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis
from chamelaion import Chamelaion
from standardwebhooks import Webhook

from relay.api.app import create_app
from relay.devtools.ports import free_ports
from relay.jobs.store import JobStore
from relay.sandbox import SandboxConfig, create_sandbox_app
from relay.serving import api_options
from relay.settings import load_settings
from relay.worker.process import WorkerState, build_state
from tests.servers import serve
from tests.stack import RELAY_KEY, SANDBOX_KEY, START_TIMEOUT, Callback, Stack, new_secret

# --- Submitting through a stack, and its callbacks ---------------------------------------------

VIDEO = "https://cdn.example.com/episodes/42.mp4"
AUDIO = "https://cdn.example.com/dubs/42-japanese.wav"


def submit(
    stack: Stack, *, video: str = VIDEO, reference_id: str | None = None, **extra: object
) -> str:
    """Submit one job with the official SDK, calling back to the stack's receiver; `extra` goes
    into the body (the relay's own fields: callback_events, callback_metadata...)."""
    kwargs: dict[str, object] = {"reference_id": reference_id} if reference_id else {}
    result = stack.sdk().lipsync.generate(
        inputs=[{"type": "video", "url": video}, {"type": "audio", "url": AUDIO}],
        extra_body={"callback_url": stack.callback_url, **extra},
        **kwargs,  # type: ignore[arg-type]
    )
    assert result.status == "success"
    return result.request_id


def submit_many(stack: Stack, callback_url: str, count: int) -> list[str]:
    """Submit `count` jobs at once (8 threads, one SDK client) with this callback URL."""
    ids: list[str] = []
    lock = threading.Lock()
    with stack.sdk() as sdk:

        def some(n: int) -> None:
            for _ in range(n):
                result = sdk.lipsync.generate(
                    inputs=[{"type": "video", "url": VIDEO}, {"type": "audio", "url": AUDIO}],
                    extra_body={"callback_url": callback_url},
                )
                with lock:
                    ids.append(result.request_id)

        shares = [count // 8 + (1 if i < count % 8 else 0) for i in range(8)]
        threads = [threading.Thread(target=some, args=(n,)) for n in shares]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(ids) == count
    return ids


def verified(stack: Stack, callback: Callback) -> dict[str, object]:
    """Verify with every configured secret, as receivers do during a rotation."""
    payloads = [
        Webhook(secret).verify(callback.body, callback.headers) for secret in stack.webhook_secrets
    ]
    assert all(payload == payloads[0] for payload in payloads)
    assert callback.headers["content-type"] == "application/json"
    assert len(callback.headers["webhook-signature"].split(" ")) == len(stack.webhook_secrets)
    payload: dict[str, object] = payloads[0]
    return payload


# --- Callers ------------------------------------------------------------------------------------


def callers_env(path: Path, *callers: dict[str, object]) -> dict[str, str]:
    """Settings for a relay whose callers are `callers`, written to the callers file `path`."""
    path.write_text(json.dumps({"callers": list(callers)}))
    return {"RELAY_CALLERS_FILE": str(path), "RELAY_API_KEYS": ""}


B_KEY = "team-b-key-0123456789abcdef"
ADMIN_KEY = "oncall-admin-key-0123456789"


def three_callers(path: Path) -> dict[str, str]:
    """Settings for a relay with callers `team-a` (the stack's own key), `team-b` (B_KEY) and
    an admin, `oncall` (ADMIN_KEY)."""
    return callers_env(
        path,
        {"name": "team-a", "keys": [RELAY_KEY]},
        {"name": "team-b", "keys": [B_KEY]},
        {"name": "oncall", "keys": [ADMIN_KEY], "role": "admin"},
    )


def submit_as(stack: Stack, key: str, reference_id: str) -> str:
    """Submit one job as the caller whose key is `key`, calling back to the stack's receiver."""
    sdk = Chamelaion(api_key=key, base_url=stack.api_url + "/api", max_retries=0)
    result = sdk.lipsync.generate(
        inputs=[{"type": "video", "url": VIDEO}, {"type": "audio", "url": AUDIO}],
        reference_id=reference_id,
        extra_body={"callback_url": stack.callback_url},
    )
    return result.request_id


def two_teams(path: Path, other_key: str) -> dict[str, str]:
    """Two callers: `team-a` holding RELAY_KEY (what the stack's helpers send), `team-b`
    holding `other_key`."""
    return callers_env(
        path, {"name": "team-a", "keys": [RELAY_KEY]}, {"name": "team-b", "keys": [other_key]}
    )


# --- The sandbox upstream -----------------------------------------------------------------------

POLL_ROUTE = "GET /v1/lipsync/requests/{id}"
LIST_ROUTE = "GET /v1/lipsync/requests"
CREATE_ROUTE = "POST /v1/lipsync/generate"
# Jobs that stay queued until a test pins their status.
SLOW = SandboxConfig(api_keys=(SANDBOX_KEY,), queued_seconds=60, processing_seconds=60)


def read_times(stack: Stack) -> list[float]:
    """When the relay asked upstream for statuses: per-id polls and list pages alike."""
    stamps = stack.upstream("GET", "/_sandbox/stats").json()["timestamps"]
    return sorted(stamps.get(POLL_ROUTE, []) + stamps.get(LIST_ROUTE, []))


def pin(stack: Stack, request_id: str, **body: object) -> None:
    """Set what the sandbox answers for a job from now on (its status, fields added or dropped)."""
    response = stack.upstream("POST", f"/_sandbox/requests/{request_id}/status", json=body)
    assert response.status_code == 200, response.text


# --- The relay's API ----------------------------------------------------------------------------

RELAY_API = "/api/relay/v1"


def relay_view(stack: Stack, request_id: str) -> dict[str, object]:
    """A job as the relay's status route shows it."""
    response = httpx.get(
        f"{stack.api_url}/api/v1/lipsync/requests/{request_id}", headers={"x-api-key": RELAY_KEY}
    )
    assert response.status_code == 200
    body: dict[str, object] = response.json()
    return body


def get(stack: Stack, path: str, **params: str) -> httpx.Response:
    """GET a path of the relay's own routes (deliveries, watches...)."""
    return httpx.get(
        stack.api_url + RELAY_API + path, params=params, headers={"x-api-key": RELAY_KEY}
    )


def post(stack: Stack, path: str, body: object = None) -> httpx.Response:
    """POST to a path of the relay's own routes."""
    return httpx.post(stack.api_url + RELAY_API + path, json=body, headers={"x-api-key": RELAY_KEY})


def attempts(stack: Stack, request_id: str) -> list[dict[str, object]]:
    """The attempt log of a job's one delivery; empty while the job has not ended."""
    deliveries = get(stack, f"/jobs/{request_id}/deliveries").json()["deliveries"]
    if not deliveries:
        return []
    [delivery] = deliveries
    found: list[dict[str, object]] = delivery["attempts"]
    return found


# --- Jobs in the store -------------------------------------------------------------------------

# How long an ended job of these helpers is kept (a test of Retry-After counts on it).
ENDED_RETENTION = 3600.0


async def end_job(store: JobStore, request_id: str) -> None:
    """End a tracked job `completed`, its callback owed, as a worker records an end it saw."""
    job = await store.get(request_id)
    assert job is not None, f"{request_id} is not tracked"
    assert await store.end(
        job,
        status="completed",
        body=b"{}",
        event_id=f"msg_{request_id}",
        event=b'{"type":"lipsync.completed"}',
        retention=ENDED_RETENTION,
        deliver=True,
    )


async def ended_job(store: JobStore, request_id: str, callback_url: str) -> None:
    """A job tracked and already ended `completed`, its callback to `callback_url` owed."""
    assert await store.create(
        request_id, callback_url=callback_url, reference_id=None, first_poll_in=60
    )
    await end_job(store, request_id)


# --- The console ------------------------------------------------------------------------------

_OPEN_CLIENTS: list[httpx.Client] = []


def closed_after_test(client: httpx.Client) -> httpx.Client:
    """`client`, closed once the test ends (tests/conftest.py), so no socket is left behind."""
    _OPEN_CLIENTS.append(client)
    return client


def close_test_clients() -> None:
    while _OPEN_CLIENTS:
        _OPEN_CLIENTS.pop().close()


def sign_in(stack: Stack, key: str = RELAY_KEY) -> httpx.Client:
    """A client signed in to the stack's console with `key` (closed after the test)."""
    client = closed_after_test(httpx.Client(base_url=stack.api_url, follow_redirects=False))
    form = client.get("/console/login")
    token = re.search(r'name="token" value="([^"]+)"', form.text)
    assert token is not None
    answer = client.post("/console/login", data={"key": key, "token": token.group(1)})
    assert answer.status_code == 303, answer.text
    return client


def csrf_of(page: str) -> str:
    """The CSRF token of a console page's form."""
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found is not None
    return found.group(1)


# --- A worker's parts in this process -----------------------------------------------------------


@contextlib.asynccontextmanager
async def worker_state(redis_url: str, **env: str) -> AsyncIterator[WorkerState]:
    """A worker's parts, built in this process as `relay worker` builds them; `env` overrides
    any setting (by default its upstream is unreachable: delivery needs none)."""
    settings = load_settings(
        **{
            "CHAMELAION_API_KEY": SANDBOX_KEY,
            "CHAMELAION_BASE_URL": "http://127.0.0.1:9/api",
            "RELAY_REDIS_URL": redis_url,
            "RELAY_WEBHOOK_SECRETS": new_secret(),
            "RELAY_CALLBACK_ALLOWED_NETWORKS": "127.0.0.0/8",
            "RELAY_CALLBACK_ALLOWED_PORTS": "1-65535",
            **env,
        }
    )
    state = await build_state(settings)
    try:
        yield state
    finally:
        await state.upstream.aclose()
        await state.callback_client.aclose()
        await state.redis.aclose()


# --- The API alone, in front of a sandbox -------------------------------------------------------


@dataclass
class Api:
    url: str
    sandbox_url: str
    redis_url: str

    def post(
        self, body: object = None, *, content: bytes | None = None, **headers: str
    ) -> httpx.Response:
        return httpx.post(
            self.url + "/api/v1/lipsync/generate",
            json=body if content is None else None,
            content=content,
            headers={"x-api-key": RELAY_KEY, **headers},
        )

    def upstream_calls(self, route: str) -> int:
        calls: dict[str, int] = httpx.get(self.sandbox_url + "/_sandbox/stats").json()["calls"]
        return calls.get(route, 0)

    def tracked(self) -> list[bytes]:
        return list(redis.Redis.from_url(self.redis_url).scan_iter("relay:job:*"))


@contextlib.contextmanager
def running_api(redis_url: str, **overrides: str) -> Iterator[Api]:
    """The relay's API (no worker) in front of a sandbox; `overrides` are settings."""
    with serve(create_sandbox_app(SandboxConfig(api_keys=(SANDBOX_KEY,)))) as sandbox_url:
        settings = load_settings(
            CHAMELAION_BASE_URL=sandbox_url + "/api",
            CHAMELAION_API_KEY=SANDBOX_KEY,
            RELAY_REDIS_URL=redis_url,
            RELAY_WEBHOOK_SECRETS=new_secret(),
            **{
                "RELAY_API_KEYS": f"other-key-0123456789,{RELAY_KEY}",
                "RELAY_CALLBACK_ALLOWED_NETWORKS": "127.0.0.0/8,::1/128",
                "RELAY_CALLBACK_ALLOWED_PORTS": "1-65535",
                **overrides,
            },
        )
        with serve(create_app(settings), **api_options(settings)) as url:
            yield Api(url, sandbox_url, redis_url)


# --- Multipart bodies for generate-with-media ---------------------------------------------------

UPLOAD = "/api/v1/lipsync/generate-with-media"
BOUNDARY = "relay-upload-test-9c1e"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def part(
    name: str, value: bytes, *, filename: str | None = None, content_type: str | None = None
) -> bytes:
    disposition = f'form-data; name="{name}"'
    if filename is not None:
        disposition += f'; filename="{filename}"'
    head = f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n"
    if content_type is not None:
        head += f"Content-Type: {content_type}\r\n"
    return head.encode() + b"\r\n" + value + b"\r\n"


def closing() -> bytes:
    return f"--{BOUNDARY}--\r\n".encode()


def form(*parts: bytes) -> bytes:
    return b"".join(parts) + closing()


def video(size: int = 64 * 1024) -> bytes:
    return part("video", os.urandom(size), filename="episode.mp4", content_type="video/mp4")


def audio(size: int = 16 * 1024) -> bytes:
    return part("audio", os.urandom(size), filename="dub.wav", content_type="audio/wav")


# `relay` processes of the tests' own (tests/test_cli.py, tests/test_tracing.py).


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "CHAMELAION_"))}
    return {**env, **extra}


def _read_until(proc: subprocess.Popen[bytes], marker: str, timeout: float = START_TIMEOUT) -> str:
    # Raw reads: a buffered reader would hide lines it already pulled from the pipe.
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    selector = selectors.DefaultSelector()
    selector.register(fd, selectors.EVENT_READ)
    seen = b""
    deadline = time.monotonic() + timeout
    while marker.encode() not in seen:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise AssertionError(f"relay dev did not print {marker!r}; got {seen!r}")
        if selector.select(timeout=0.1):
            seen += os.read(fd, 65536)
    return seen.decode()


@contextlib.contextmanager
def relay_dev(**env: str) -> Iterator[tuple[int, str]]:
    """`relay dev` with `env` over a clean environment, on a port of its own and the next two
    (its sandbox and inbox): yields the port and the banner it printed, up to "Ctrl-C". At the
    block's end it gets Ctrl-C, and must exit 0."""
    port = free_ports(3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay.cli", "dev", "--port", str(port)],
        env=clean_env(**env),
        stdout=subprocess.PIPE,
    )
    try:
        yield port, _read_until(proc, "Ctrl-C")
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()
    assert code == 0, f"relay dev exited with {code} on Ctrl-C"
