"""Hostile callers on loopback: uploads that try to starve everyone, and slow or idle clients.

Every wait is bounded by a count and a deadline; nothing asserts how fast anything was.
"""

from __future__ import annotations

import contextlib
import functools
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
from starlette.types import Receive, Scope, Send

from relay.api.protocol import Limits, body_received, peer_of, protocol_class
from tests.helpers import BOUNDARY, MULTIPART, UPLOAD, audio, form, two_teams, video
from tests.servers import serve
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
def capped(redis_url: str, tmp_path: Path) -> Iterator[Stack]:
    env = {
        **two_teams(tmp_path / "callers.json", OTHER_KEY),
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
        assert "this caller already has 2 uploads" in per_key.json()["error"]
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


def test_a_json_body_that_comes_after_its_headers_within_the_body_timeout_is_read(
    strict: Stack,
) -> None:
    # The body timeout is armed while some of the body is still to come (relay.api.body): a
    # body sent once the route is already waiting for it is read whole, and the job created.
    body = orjson.dumps(
        {
            "inputs": [
                {"type": "video", "url": "https://cdn.example.com/v.mp4"},
                {"type": "audio", "url": "https://cdn.example.com/a.wav"},
            ]
        }
    )
    with connection(strict) as sock:
        sock.sendall(
            b"POST /api/v1/lipsync/generate HTTP/1.1\r\nHost: relay\r\n"
            + f"x-api-key: {RELAY_KEY}\r\n".encode()
            + f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode()
            + body[:10]
        )
        time.sleep(0.3)
        sock.sendall(body[10:])
        answer = closed_by_server(sock)  # the keep-alive timeout (1 s) closes it after
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b'"request_id"' in answer


def body_received_at_start(request_head: bytes, body: bytes, *, separately: bool) -> bytes:
    """What an app under the API's protocol sees of `body_received` as it starts, the body sent
    with the head, or (`separately`) once the app has started; then the body it read."""
    started = threading.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        received = body_received(scope)
        started.set()
        read = b""
        more = True
        while more:
            message = await receive()
            read += message.get("body", b"")
            more = message.get("more_body", False)
        answer = b"received " + str(received).encode() + b": " + read
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(answer)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": answer})

    limits = Limits(
        header_timeout=5, max_requests=10, max_connections=10, max_connections_per_peer=10
    )
    with serve(app, http=protocol_class(limits)) as url:
        host, port = urlsplit(url).hostname, urlsplit(url).port
        assert host is not None and port is not None
        with socket.create_connection((host, port), timeout=10) as sock:
            if separately:
                sock.sendall(request_head)
                assert started.wait(10)
                sock.sendall(body)
            else:
                sock.sendall(request_head + body)
            answer = b""
            while not answer.endswith(body):
                data = sock.recv(65536)
                assert data, answer
                answer += data
    return answer.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize(("separately", "received"), [(False, b"True"), (True, b"False")])
def test_the_protocol_says_whether_a_body_has_all_arrived(
    separately: bool, received: bytes
) -> None:
    body = b'{"hello": "world"}'
    head = f"POST /x HTTP/1.1\r\nHost: relay\r\ncontent-length: {len(body)}\r\n\r\n".encode()
    answer = body_received_at_start(head, body, separately=separately)
    assert answer == b"received " + received + b": " + body


def test_no_body_is_taken_as_received_under_another_server() -> None:
    scope: Scope = {"type": "http", "state": {}}
    assert body_received(scope) is False


def stall_json_body(sock: socket.socket) -> None:
    """Start a JSON submission that never sends its body: a request in flight until the body
    timeout ends it."""
    sock.sendall(
        b"POST /api/v1/lipsync/generate HTTP/1.1\r\nHost: relay\r\n"
        + f"x-api-key: {RELAY_KEY}\r\n".encode()
        + b"content-type: application/json\r\ncontent-length: 100\r\n\r\n{"
    )


def test_requests_in_flight_beyond_the_limit_get_503(redis_url: str) -> None:
    env = {"RELAY_HTTP_MAX_CONCURRENCY": "2", "RELAY_HTTP_BODY_TIMEOUT": "60"}
    with relay_stack(redis_url, workers=0, env=env) as stack:
        with contextlib.ExitStack() as held:
            for _ in range(2):
                stall_json_body(held.enter_context(connection(stack)))
            over = eventually(lambda: over_limit(stack))
            assert over.json()["error"].startswith("the relay is handling as many requests")
            assert over.headers["retry-after"] == "1"
        eventually(lambda: httpx.get(stack.api_url + "/healthz").status_code == 200)


def over_limit(stack: Stack) -> httpx.Response | None:
    answer = httpx.get(stack.api_url + "/healthz")
    return answer if answer.status_code == 503 else None


def connect_from(stack: Stack, source: str) -> socket.socket:
    """A connection from another loopback address: another peer, as the server sees it."""
    return socket.create_connection(address(stack), timeout=10, source_address=(source, 0))


def healthz_on(sock: socket.socket) -> bytes:
    """GET /healthz on `sock`; the whole answer (its head, and a body of content-length)."""
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
    sock.settimeout(10)
    answer = b""
    while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < length(answer):
        data = sock.recv(65536)
        assert data, f"closed after {answer!r}"
        answer += data
    return answer


def length(answer: bytes) -> int:
    found = re.search(rb"content-length: (\d+)", answer.lower())
    return int(found.group(1)) if found else 0


def test_idle_connections_never_turn_requests_away(redis_url: str) -> None:
    # Finding 3 of #24: 55 connections that sent nothing made every real request get 503,
    # because uvicorn's limit counted connections, not requests.
    env = {"RELAY_HTTP_MAX_CONCURRENCY": "4", "RELAY_HTTP_HEADER_TIMEOUT": "60"}
    with relay_stack(redis_url, workers=0, env=env) as stack, contextlib.ExitStack() as held:
        idle = [
            held.enter_context(contextlib.closing(connect_from(stack, "127.0.0.2")))
            for _ in range(12)
        ]
        idle[0].sendall(b"GET /healthz HTTP/1.1\r\n")  # headers begun, never ended
        for _ in range(10):
            assert httpx.get(stack.api_url + "/healthz").status_code == 200
        sdk = stack.sdk()
        assert sdk.lipsync.requests.list().data is not None


def test_a_peer_over_its_connection_cap_loses_its_longest_idle_connection(redis_url: str) -> None:
    env = {"RELAY_HTTP_MAX_CONNECTIONS_PER_PEER": "3", "RELAY_HTTP_HEADER_TIMEOUT": "60"}
    with relay_stack(redis_url, workers=0, env=env) as stack, contextlib.ExitStack() as held:
        first, second, third = (
            held.enter_context(contextlib.closing(connect_from(stack, "127.0.0.2")))
            for _ in range(3)
        )
        # Idle again after a request each, in this order: `second` has been idle longest.
        for sock in (second, third, first):
            assert healthz_on(sock).startswith(b"HTTP/1.1 200")
        fourth = held.enter_context(contextlib.closing(connect_from(stack, "127.0.0.2")))
        assert closed_by_server(second) == b""
        assert healthz_on(fourth).startswith(b"HTTP/1.1 200")
        assert healthz_on(first).startswith(b"HTTP/1.1 200")
        # Another peer is not this one's business.
        assert httpx.get(stack.api_url + "/healthz").status_code == 200
        assert healthz_on(third).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize(
    ("host", "peer"),
    [
        ("10.1.2.3", "10.1.2.3"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        (None, ""),
    ],
)
def test_an_ipv6_client_counts_as_one_peer_per_64(host: str | None, peer: str) -> None:
    assert peer_of(host) == peer


def test_past_the_connection_cap_the_longest_idle_connection_makes_room(redis_url: str) -> None:
    env = {"RELAY_HTTP_MAX_CONNECTIONS": "4", "RELAY_HTTP_HEADER_TIMEOUT": "60"}
    with relay_stack(redis_url, workers=0, env=env) as stack, contextlib.ExitStack() as held:
        idle = [
            held.enter_context(contextlib.closing(connect_from(stack, f"127.0.0.{peer}")))
            for peer in range(2, 6)
        ]
        idle[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n")  # never ended
        for sock in idle[1:]:  # idle again after a request: more recently than idle[0]
            assert healthz_on(sock).startswith(b"HTTP/1.1 200")
        assert httpx.get(stack.api_url + "/healthz").status_code == 200
        assert closed_by_server(idle[0]) == b""
        assert healthz_on(idle[1]).startswith(b"HTTP/1.1 200")


def test_past_the_connection_cap_with_every_connection_busy_a_new_one_is_closed(
    redis_url: str,
) -> None:
    env = {"RELAY_HTTP_MAX_CONNECTIONS": "2", "RELAY_HTTP_BODY_TIMEOUT": "60"}
    with relay_stack(redis_url, workers=0, env=env) as stack:
        with contextlib.ExitStack() as held:
            for _ in range(2):
                # Served once first, so the server has taken it in: a connection it has yet to
                # take in when the probe below comes is idle, and the probe evicts it instead.
                sock = held.enter_context(connection(stack))
                assert healthz_on(sock).startswith(b"HTTP/1.1 200")
                stall_json_body(sock)
            eventually(lambda: refused(stack))
        eventually(lambda: httpx.get(stack.api_url + "/healthz").status_code == 200)


def refused(stack: Stack) -> bool:
    try:
        return httpx.get(stack.api_url + "/healthz").status_code == 0
    except httpx.TransportError:
        return True


# The head of a request (request line and headers) the API reads before answering 431.
MAX_HEAD = 64 * 1024


def send_until_answered(sock: socket.socket, head: bytes, filler: bytes, limit: int) -> bytes:
    """Send `head`, then `filler` over and over up to `limit` bytes in all, until the server
    answers or closes; return what it answered. Fails when it took it all in silence."""
    sock.sendall(head)
    sent = len(head)
    sock.setblocking(False)
    while sent < limit:
        try:
            sent += sock.send(filler)
        except BlockingIOError:
            pass
        except (BrokenPipeError, ConnectionResetError):
            break
        try:
            answer = sock.recv(65536)
        except BlockingIOError:
            continue
        except ConnectionResetError:
            break
        return answer + closed_by_server(sock)
    try:
        return closed_by_server(sock, rounds=50)
    except AssertionError:
        raise AssertionError(f"the server took {sent} bytes of headers in silence") from None


@pytest.fixture
def api(redis_url: str) -> Iterator[Stack]:
    with relay_stack(redis_url, workers=0, env={"RELAY_HTTP_HEADER_TIMEOUT": "60"}) as stack:
        yield stack


def test_an_endless_header_is_answered_431_and_closed(api: Stack) -> None:
    # Finding 4 of #24: one header value streamed for 10 s was taken in up to 115 MB.
    with connection(api) as sock:
        head = b"GET /healthz HTTP/1.1\r\nHost: relay\r\nX-Endless: "
        answer = send_until_answered(sock, head, b"a" * 4096, limit=64 * 2**20)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"connection: close" in answer.lower()
    assert b"request headers are larger than 65536 bytes" in answer
    assert httpx.get(api.api_url + "/healthz").status_code == 200


def test_an_endless_request_line_is_answered_431(api: Stack) -> None:
    with connection(api) as sock:
        answer = send_until_answered(sock, b"GET /", b"a" * 4096, limit=64 * 2**20)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]


def test_many_headers_in_all_past_the_limit_are_answered_431(api: Stack) -> None:
    with connection(api) as sock:
        head = b"GET /healthz HTTP/1.1\r\nHost: relay\r\n"
        answer = send_until_answered(sock, head, b"X-Many: " + b"b" * 1000 + b"\r\n", 2**20)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]


def test_heads_up_to_the_limit_pass_on_one_connection_one_after_another(api: Stack) -> None:
    request_line = b"GET /healthz HTTP/1.1\r\n"
    end = b"Host: relay\r\n\r\n"
    filler = MAX_HEAD - len(request_line) - len(end) - len(b"X-Big: \r\n")
    head = request_line + b"X-Big: " + b"c" * filler + b"\r\n" + end
    assert len(head) == MAX_HEAD
    with connection(api) as sock:
        # Twice on one connection: each request's head is counted from its own start; then
        # two pipelined in one send.
        for payload in (head, head, head + head):
            sock.sendall(payload)
            answers = b""
            while answers.count(b"HTTP/1.1 200") < payload.count(b"GET /healthz"):
                data = sock.recv(65536)
                assert data, answers
                answers += data
            assert b"431" not in answers
    with connection(api) as sock:
        over = head.replace(b"X-Big: ", b"X-Big: d")
        answer = send_until_answered(sock, over, b"", limit=len(over))
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
