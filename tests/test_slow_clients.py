"""Hostile callers on loopback: uploads that try to starve everyone, and slow or idle clients.

Every wait is bounded by a count and a deadline; nothing asserts how fast anything was.
"""

from __future__ import annotations

import contextlib
import functools
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from tests.helpers import BOUNDARY, MULTIPART, UPLOAD, audio, form, video
from tests.stack import RELAY_KEY, Stack, eventually, relay_stack

OTHER_KEY = "another-caller-key-0123456789"


def address(stack: Stack) -> tuple[str, int]:
    url = urlsplit(stack.api_url)
    assert url.hostname is not None and url.port is not None
    return url.hostname, url.port


@contextlib.contextmanager
def connection(stack: Stack) -> Iterator[socket.socket]:
    sock = socket.create_connection(address(stack), timeout=10)
    try:
        yield sock
    finally:
        sock.close()


def upload_head(stack: Stack, key: str, length: int = 10**9) -> bytes:
    """A request head and the body up to the first bytes of the video file."""
    start = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="video"; filename="v.mp4"\r\n'
    start += "Content-Type: video/mp4\r\n\r\n"
    head = (
        f"POST {UPLOAD} HTTP/1.1\r\nHost: {urlsplit(stack.api_url).netloc}\r\n"
        f"x-api-key: {key}\r\ncontent-type: {MULTIPART}\r\ncontent-length: {length}\r\n\r\n"
    )
    return head.encode() + start.encode() + b"\x00" * 1024


def closed_by_server(sock: socket.socket, *, trickle: bytes = b"", rounds: int = 60) -> bytes:
    """Read until the server closes; send `trickle` every 0.2 s meanwhile. Returns what came;
    fails when the connection is still open after `rounds` rounds."""
    sock.settimeout(0.2)
    received = b""
    for _ in range(rounds):
        try:
            data = sock.recv(65536)
        except TimeoutError:
            if trickle:
                try:
                    sock.sendall(trickle)
                except OSError:
                    return received
            continue
        except ConnectionResetError:
            return received
        if not data:
            return received
        received += data
    raise AssertionError(f"the server kept the connection open; got {received[:200]!r}")


def uploads_in_progress(stack: Stack) -> float:
    for line in httpx.get(stack.api_url + "/metrics").text.splitlines():
        if line.startswith("relay_uploads_in_progress "):
            return float(line.split()[1])
    raise AssertionError("no relay_uploads_in_progress metric")


def in_progress_is(stack: Stack, count: int) -> bool:
    return uploads_in_progress(stack) == count


@pytest.fixture
def capped(redis_url: str) -> Iterator[Stack]:
    env = {
        "RELAY_API_KEYS": f"{RELAY_KEY},{OTHER_KEY}",
        "RELAY_MAX_UPLOADS": "3",
        "RELAY_MAX_UPLOADS_PER_KEY": "2",
    }
    with relay_stack(redis_url, workers=0, env=env) as stack:
        yield stack


def small_upload(stack: Stack, key: str) -> httpx.Response:
    return httpx.post(
        stack.api_url + UPLOAD,
        content=form(video(), audio()),
        headers={"x-api-key": key, "content-type": MULTIPART},
        timeout=30,
    )


def test_uploads_are_capped_per_key_and_in_total_and_never_block_other_calls(
    capped: Stack,
) -> None:
    # Finding 3: stalled uploads held shared upstream connections without any cap, and an
    # unrelated status read waited behind them.
    stack = capped
    with contextlib.ExitStack() as held:
        for count, key in enumerate((RELAY_KEY, RELAY_KEY, OTHER_KEY), start=1):
            sock = held.enter_context(connection(stack))
            sock.sendall(upload_head(stack, key))
            eventually(functools.partial(in_progress_is, stack, count))

        per_key = small_upload(stack, RELAY_KEY)
        assert per_key.status_code == 429, per_key.text
        assert "this key already has 2 uploads" in per_key.json()["error"]
        assert int(per_key.headers["retry-after"]) > 0
        total = small_upload(stack, OTHER_KEY)
        assert total.status_code == 429, total.text
        assert "as many uploads as it takes" in total.json()["error"]
        assert int(total.headers["retry-after"]) > 0

        # Other routes use their own upstream connections and answer meanwhile.
        sdk = stack.sdk()
        job = sdk.lipsync.generate(
            inputs=[
                {"type": "video", "url": "https://cdn.example.com/a.mp4"},
                {"type": "audio", "url": "https://cdn.example.com/a.wav"},
            ]
        )
        assert sdk.lipsync.requests.retrieve(job.request_id).id == job.request_id
    # The held uploads ended with their connections: their slots are free again.
    eventually(functools.partial(in_progress_is, stack, 0))
    assert small_upload(stack, RELAY_KEY).status_code == 200


def test_an_upload_trickling_below_the_minimum_rate_is_ended(redis_url: str) -> None:
    # Finding 3: one byte now and then kept an upload (and its slot) alive for ever.
    env = {"RELAY_UPSTREAM_TIMEOUT": "1", "RELAY_UPLOAD_MIN_RATE": "10000"}
    with relay_stack(redis_url, workers=0, env=env) as stack, connection(stack) as sock:
        sock.sendall(upload_head(stack, RELAY_KEY))
        answer = closed_by_server(sock, trickle=b"\x00")
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"upload too slow" in answer
        eventually(functools.partial(in_progress_is, stack, 0))


@pytest.fixture
def strict(redis_url: str) -> Iterator[Stack]:
    env = {
        "RELAY_HTTP_HEADER_TIMEOUT": "1",
        "RELAY_HTTP_KEEPALIVE_TIMEOUT": "1",
        "RELAY_HTTP_BODY_TIMEOUT": "1",
    }
    with relay_stack(redis_url, workers=0, env=env) as stack:
        yield stack


def test_partial_headers_are_cut_off(strict: Stack) -> None:
    # Finding 8: a header line every so often held a connection for ever.
    with connection(strict) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n")
        assert closed_by_server(sock, trickle=b"x") == b""


def test_an_idle_connection_is_closed(strict: Stack) -> None:
    with connection(strict) as sock:
        assert closed_by_server(sock) == b""


def test_an_idle_keep_alive_connection_is_closed(strict: Stack) -> None:
    with connection(strict) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
        answer = closed_by_server(sock)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


def test_a_stalled_json_body_after_auth_is_answered_408_and_closed(strict: Stack) -> None:
    with connection(strict) as sock:
        sock.sendall(
            b"POST /api/v1/lipsync/generate HTTP/1.1\r\nHost: relay\r\n"
            + f"x-api-key: {RELAY_KEY}\r\n".encode()
            + b'content-type: application/json\r\ncontent-length: 100\r\n\r\n{"inputs"'
        )
        answer = closed_by_server(sock)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"request body not received within 1 s" in answer


def test_connections_beyond_the_concurrency_limit_get_503(redis_url: str) -> None:
    env = {"RELAY_HTTP_MAX_CONCURRENCY": "4", "RELAY_HTTP_HEADER_TIMEOUT": "30"}
    with relay_stack(redis_url, workers=0, env=env) as stack:
        with contextlib.ExitStack() as held:
            for _ in range(4):
                held.enter_context(connection(stack)).sendall(b"GET /healthz HTTP/1.1\r\n")
            # The fifth connection is over the limit: uvicorn answers it 503.
            eventually(lambda: httpx.get(stack.api_url + "/healthz").status_code == 503)
        eventually(lambda: httpx.get(stack.api_url + "/healthz").status_code == 200)
