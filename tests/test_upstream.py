"""The Chamelaion client against a real HTTP server on loopback, and its error mapping."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx
import orjson
import pytest
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from relay.devtools.ports import free_port
from relay.errors import UpstreamError
from relay.settings import load_settings
from relay.upstream import (
    ROW_BYTES,
    USER_AGENT,
    AnswerTooLarge,
    Upstream,
    answer_cap,
    check,
    decode_object,
    endpoint_name,
    parse_retry_after,
)
from tests.servers import serve

API_KEY = "sk-upstream-secret-0123456789"


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeChamelaion:
    """Records every request; `/answer/{status}` answers as its query asks, `/hang` hangs."""

    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    def app(self) -> Starlette:
        async def record(request: Request) -> Seen:
            seen = Seen(
                request.method,
                request.url.path,
                request.url.query,
                dict(request.headers),
                await request.body(),
            )
            self.seen.append(seen)
            return seen

        async def echo(request: Request) -> Response:
            await record(request)
            return JSONResponse({"ok": True})

        async def answer(request: Request) -> Response:
            seen = await record(request)
            query = request.query_params
            headers = {
                name.removeprefix("h-"): value
                for name, value in query.items()
                if name.startswith("h-")
            }
            if query.get("echo_key") == "1":
                # An upstream that quotes the key it refused back at us.
                content = orjson.dumps({"error": f"invalid key {seen.headers['x-api-key']}"})
            else:
                content = query.get("body", "").encode()
            return Response(
                content,
                status_code=int(request.path_params["status"]),
                headers=headers,
                media_type=query.get("type", "application/json"),
            )

        async def big(request: Request) -> Response:
            """`size` bytes of a JSON object, streamed in chunks, gzipped when asked."""
            await record(request)
            size = int(request.query_params["size"])
            body = b'{"padding": "' + b"x" * max(0, size - 15) + b'"}'
            if request.query_params.get("gzip") == "1":
                return Response(
                    gzip.compress(body),
                    headers={"content-encoding": "gzip"},
                    media_type="application/json",
                )

            async def chunks() -> AsyncIterator[bytes]:
                for start in range(0, len(body), 65536):
                    yield body[start : start + 65536]

            return StreamingResponse(chunks(), media_type="application/json")

        async def hang(request: Request) -> Response:
            await record(request)
            await asyncio.to_thread(self.release.wait, 10)
            return JSONResponse({"late": True})

        return Starlette(
            routes=[
                Route("/api/v1/echo", echo, methods=["GET", "POST"]),
                Route("/api/answer/{status:int}", answer),
                Route("/api/hang", hang),
                Route("/api/big", big),
            ]
        )


@pytest.fixture(scope="module")
def chamelaion() -> Iterator[FakeChamelaion]:
    fake = FakeChamelaion()
    with serve(fake.app()) as url:
        fake.url = url
        try:
            yield fake
        finally:
            fake.release.set()  # let a hung handler finish so the server stops promptly


@pytest.fixture
def fake(chamelaion: FakeChamelaion) -> FakeChamelaion:
    chamelaion.seen.clear()
    return chamelaion


@contextlib.asynccontextmanager
async def client(base_url: str, *, timeout: float = 5.0) -> AsyncIterator[Upstream]:
    upstream = Upstream(base_url, API_KEY, timeout=timeout)
    try:
        yield upstream
    finally:
        await upstream.aclose()


async def answer(
    fake: FakeChamelaion, status: int, body: bytes | str = b"", **headers: str
) -> httpx.Response:
    """A real response from the fake with this status, body and headers (not yet checked)."""
    raw = body.decode() if isinstance(body, bytes) else body
    params = {"body": raw, **{f"h-{name}": value for name, value in headers.items()}}
    async with client(fake.url + "/api") as upstream:
        return await upstream.request("GET", f"answer/{status}", params=params)


def calls(endpoint: str, status: str) -> float:
    labels = {"endpoint": endpoint, "status": status}
    return REGISTRY.get_sample_value("relay_upstream_calls_total", labels) or 0.0


def error_json(message: str) -> bytes:
    return orjson.dumps({"error": message})


# The request as sent


async def test_every_request_carries_the_api_key_and_user_agent(fake: FakeChamelaion) -> None:
    async with client(fake.url + "/api/") as upstream:
        first = await upstream.request("GET", "v1/echo", params={"limit": "5"})
        second = await upstream.request("GET", "/v1/echo")
    assert first.status_code == second.status_code == 200
    assert [seen.path for seen in fake.seen] == ["/api/v1/echo", "/api/v1/echo"]
    assert fake.seen[0].query == "limit=5"
    for seen in fake.seen:
        assert seen.headers["x-api-key"] == API_KEY
        assert seen.headers["user-agent"] == USER_AGENT


async def test_a_json_body_is_sent_as_json(fake: FakeChamelaion) -> None:
    payload = {"inputs": [{"type": "video", "url": "https://x.example/v.mp4"}], "note": "ünï"}
    async with client(fake.url + "/api") as upstream:
        await upstream.request("POST", "v1/echo", json=payload)
        await upstream.request(
            "POST", "v1/echo", content=b"raw bytes", headers={"content-type": "text/plain"}
        )
    sent_json, sent_raw = fake.seen
    assert sent_json.method == "POST"
    assert sent_json.headers["content-type"] == "application/json"
    assert orjson.loads(sent_json.body) == payload
    assert sent_json.body == orjson.dumps(payload)
    assert sent_raw.body == b"raw bytes" and sent_raw.headers["content-type"] == "text/plain"
    assert sent_raw.headers["x-api-key"] == API_KEY


async def test_from_settings_uses_the_configured_url_key_and_timeout(
    fake: FakeChamelaion,
) -> None:
    settings = load_settings(
        CHAMELAION_BASE_URL=fake.url + "/api/",
        CHAMELAION_API_KEY="sk-from-settings",
        RELAY_UPSTREAM_TIMEOUT="3",
    )
    upstream = Upstream.from_settings(settings)
    try:
        response = await upstream.request("GET", "v1/echo")
        assert upstream.timeout.read == 3 and upstream.timeout.connect == 3
    finally:
        await upstream.aclose()
    assert response.status_code == 200
    [seen] = fake.seen
    assert seen.path == "/api/v1/echo"
    assert seen.headers["x-api-key"] == "sk-from-settings"
    assert seen.headers["user-agent"] == USER_AGENT


async def test_answers_are_returned_as_they_are(fake: FakeChamelaion) -> None:
    before = calls("answer/404", "404")
    response = await answer(fake, 404, error_json("lipsync request not found"))
    assert response.status_code == 404
    assert response.json() == {"error": "lipsync request not found"}
    assert calls("answer/404", "404") == before + 1


# The cap on what is read of an answer


def cut(endpoint: str) -> float:
    labels = {"endpoint": endpoint}
    return REGISTRY.get_sample_value("relay_upstream_answers_cut_total", labels) or 0.0


@pytest.mark.parametrize("compressed", [False, True])
async def test_an_answer_past_the_cap_is_cut_off_and_counted(
    fake: FakeChamelaion, compressed: bool
) -> None:
    upstream = Upstream(fake.url + "/api", API_KEY, timeout=5, max_answer_bytes=300_000)
    gz = {"gzip": "1"} if compressed else {}
    try:
        before = cut("big")
        # Within the cap: read whole, decoded, the encoding it came in gone from the headers.
        whole = await upstream.request("GET", "big", params={"size": "300000", **gz})
        assert len(whole.content) == 300_000 and whole.json()["padding"].startswith("xxx")
        assert "content-encoding" not in whole.headers
        assert cut("big") == before
        # Past it: cut off, counted, an error; a gzip bomb counts by what it unpacks to.
        with pytest.raises(AnswerTooLarge) as caught:
            await upstream.request("GET", "big", params={"size": "8388608", **gz})
        assert caught.value.status_code == 502
        assert "longer than 300000 bytes" in caught.value.message
        assert cut("big") == before + 1
        # The connection is left behind, not the client: the next call is answered.
        assert (await upstream.request("GET", "v1/echo")).json() == {"ok": True}
    finally:
        await upstream.aclose()


def test_the_cap_is_a_page_of_the_largest_size_asked_for_plus_room() -> None:
    default = load_settings(CHAMELAION_API_KEY="k")
    assert 1000 * ROW_BYTES < answer_cap(default) < 8 * 1024 * 1024
    bigger = load_settings(CHAMELAION_API_KEY="k", RELAY_SWEEP_PAGE_SIZE="5000")
    assert answer_cap(bigger) > 5000 * ROW_BYTES
    assert Upstream.from_settings(bigger).max_answer_bytes == answer_cap(bigger)


# Transport failures


@contextlib.contextmanager
def hanging_up_server() -> Iterator[str]:
    """A TCP server on loopback that reads each request and closes without a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.05)
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn, contextlib.suppress(OSError):
                conn.settimeout(2)
                conn.recv(65536)

    thread = threading.Thread(target=run, name="hanging-up-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


@contextlib.contextmanager
def unreachable(kind: str) -> Iterator[str]:
    if kind == "refused":
        yield f"http://127.0.0.1:{free_port()}"  # nothing listens there
    else:
        with hanging_up_server() as url:
            yield url


@pytest.mark.parametrize("kind", ["refused", "hangs-up"])
async def test_an_unreachable_upstream_is_an_upstream_error(kind: str) -> None:
    endpoint = "lipsync/requests/{id}"
    before = calls(endpoint, "unreachable")
    with unreachable(kind) as url:
        async with client(url + "/api", timeout=5) as upstream:
            started = time.monotonic()
            with pytest.raises(UpstreamError) as caught:
                await upstream.request("GET", "v1/lipsync/requests/abc")
            elapsed = time.monotonic() - started
    assert elapsed < 2, "a refusal is reported at once, not after the timeout"
    assert isinstance(caught.value.__cause__, httpx.HTTPError)
    assert API_KEY not in str(caught.value)
    assert calls(endpoint, "unreachable") == before + 1


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("refused", "could not reach Chamelaion"),
        # Connected, so the request may have arrived: not "could not reach".
        ("hangs-up", "the connection to Chamelaion was lost"),
    ],
)
async def test_an_unreachable_upstream_is_a_502(kind: str, message: str) -> None:
    with unreachable(kind) as url:
        async with client(url + "/api", timeout=5) as upstream:
            with pytest.raises(UpstreamError) as caught:
                await upstream.request("GET", "v1/lipsync/requests/abc")
    assert caught.value.status_code == 502
    assert caught.value.message == message


async def test_an_upstream_that_hangs_past_the_timeout_is_a_504(fake: FakeChamelaion) -> None:
    async with client(fake.url + "/api", timeout=0.3) as upstream:
        started = time.monotonic()
        with pytest.raises(UpstreamError) as caught:
            await upstream.request("GET", "hang")
        elapsed = time.monotonic() - started
    assert caught.value.status_code == 504
    assert caught.value.message == "Chamelaion did not answer in time"
    assert isinstance(caught.value.__cause__, httpx.TimeoutException)
    assert 0.25 <= elapsed < 3, elapsed
    assert [seen.path for seen in fake.seen] == ["/api/hang"], "it was sent, then waited on"


async def test_a_per_request_timeout_overrides_the_clients(fake: FakeChamelaion) -> None:
    async with client(fake.url + "/api", timeout=30) as upstream:
        started = time.monotonic()
        with pytest.raises(UpstreamError) as caught:
            await upstream.request("GET", "hang", timeout=httpx.Timeout(0.3))
    assert caught.value.status_code == 504
    assert time.monotonic() - started < 3


# check: Chamelaion's answers mapped to the relay caller's errors


@pytest.mark.parametrize("status", [200, 201, 202, 204])
async def test_check_passes_success_through(fake: FakeChamelaion, status: int) -> None:
    response = await answer(fake, status, b"" if status == 204 else b'{"ok":true}')
    assert check(response) is response


@pytest.mark.parametrize("status", [401, 403])
async def test_check_blames_the_relays_own_key_without_revealing_it(
    fake: FakeChamelaion, status: int
) -> None:
    async with client(fake.url + "/api") as upstream:
        response = await upstream.request("GET", f"answer/{status}", params={"echo_key": "1"})
    assert API_KEY in response.text, "the fake quotes the key back"
    with pytest.raises(UpstreamError) as caught:
        check(response)
    error = caught.value
    assert error.status_code == 502
    assert "CHAMELAION_API_KEY" in error.message
    assert API_KEY not in error.message and API_KEY not in str(error)
    assert all(API_KEY not in value for value in error.headers.values())
    assert error.details is None


@pytest.mark.parametrize(
    ("headers", "retry_after"),
    [
        ({"retry-after": "3"}, "3"),
        ({"retry-after-ms": "7000"}, "7"),
        ({"retry-after": "0.3"}, "1"),  # never tells the caller to retry at once
    ],
)
async def test_check_passes_a_429_on_with_its_retry_after(
    fake: FakeChamelaion, headers: dict[str, str], retry_after: str
) -> None:
    response = await answer(fake, 429, error_json("rate limit exceeded"), **headers)
    with pytest.raises(UpstreamError) as caught:
        check(response)
    assert caught.value.status_code == 429
    assert caught.value.headers == {"retry-after": retry_after}
    assert "rate limit" in caught.value.message


async def test_check_passes_a_429_without_retry_after_on_without_one(
    fake: FakeChamelaion,
) -> None:
    response = await answer(fake, 429, error_json("rate limit exceeded"), **{"retry-after": "x"})
    with pytest.raises(UpstreamError) as caught:
        check(response)
    assert caught.value.status_code == 429
    assert caught.value.headers == {}


@pytest.mark.parametrize("status", [400, 404, 409, 413, 415, 422])
async def test_check_passes_the_callers_own_mistakes_through(
    fake: FakeChamelaion, status: int
) -> None:
    response = await answer(fake, status, error_json(f"refused as sent ({status})"))
    with pytest.raises(UpstreamError) as caught:
        check(response)
    assert caught.value.status_code == status
    assert caught.value.message == f"refused as sent ({status})"


@pytest.mark.parametrize("status", [402, 405, 410, 418])
async def test_check_maps_other_refusals_to_400(fake: FakeChamelaion, status: int) -> None:
    response = await answer(fake, status, "<html>nope</html>")
    with pytest.raises(UpstreamError) as caught:
        check(response)
    assert caught.value.status_code == 400
    assert caught.value.message == f"Chamelaion refused the request ({status})"


async def test_check_keeps_only_the_start_of_a_long_error_message(fake: FakeChamelaion) -> None:
    response = await answer(fake, 422, error_json("x" * 5_000))
    with pytest.raises(UpstreamError) as caught:
        check(response)
    assert caught.value.message == "x" * 500


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (500, error_json("database on fire"), "Chamelaion failed: database on fire"),
        (502, b"<html>bad gateway</html>", "Chamelaion failed: HTTP 502"),
        (503, b"", "Chamelaion failed: HTTP 503"),
        (302, b"", "Chamelaion failed: HTTP 302"),  # redirects are not followed
    ],
)
async def test_check_maps_upstream_failures_to_502(
    fake: FakeChamelaion, status: int, body: bytes, message: str
) -> None:
    response = await answer(fake, status, body, **{"retry-after": "5"})
    with pytest.raises(UpstreamError) as caught:
        check(response)
    assert caught.value.status_code == 502
    assert caught.value.message == message
    assert caught.value.headers == {}


# decode_object


async def test_decode_object_returns_a_json_object(fake: FakeChamelaion) -> None:
    response = await answer(fake, 200, b'{"id":"abc","status":"queued"}')
    assert decode_object(response) == {"id": "abc", "status": "queued"}


@pytest.mark.parametrize("body", [b"<html>hello</html>", b"", b'["a list"]', b'"text"', b"{"])
async def test_decode_object_refuses_anything_else_with_502(
    fake: FakeChamelaion, body: bytes
) -> None:
    response = await answer(fake, 200, body)
    with pytest.raises(UpstreamError) as caught:
        decode_object(response)
    assert caught.value.status_code == 502


# parse_retry_after and endpoint_name


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "0"}, 0.0),
        ({"retry-after": " 2.5 "}, 2.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        # A bad retry-after-ms does not hide a good retry-after.
        ({"retry-after-ms": "-5", "retry-after": "3"}, 3.0),
        ({"retry-after-ms": "soon", "retry-after": "3"}, 3.0),
        ({"retry-after": str(7 * 86400 - 1)}, 7 * 86400 - 1.0),
        ({"retry-after": "-1"}, None),
        ({"retry-after-ms": "-1"}, None),
        ({"retry-after": str(7 * 86400)}, None),
        ({"retry-after": "1e308"}, None),
        ({"retry-after": "inf"}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, None),
        ({"retry-after": ""}, None),
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], seconds: float | None) -> None:
    assert parse_retry_after(httpx.Headers(headers)) == seconds


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("v1/lipsync/requests/0b0e4d1c-1d59-4b8e-9f0e-1f6f1d1c2b3a", "lipsync/requests/{id}"),
        ("/v1/lipsync/requests/abc/", "lipsync/requests/{id}"),
        ("v1/lipsync/requests", "lipsync/requests"),
        ("v1/lipsync/generate", "lipsync/generate"),
        ("/v1/lipsync/generate-with-media", "lipsync/generate-with-media"),
    ],
)
def test_endpoint_name_never_labels_a_request_id(path: str, name: str) -> None:
    assert endpoint_name(path) == name
