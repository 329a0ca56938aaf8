"""Test events: a signed `relay.test` sent now, and what the receiver answered."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from relay.devtools.ports import free_port
from tests.helpers import two_teams
from tests.servers import serve
from tests.stack import RELAY_KEY, Receiver, Stack, relay_stack

GENERATE = {
    "inputs": [
        {"type": "video", "url": "https://cdn.example.com/v.mp4"},
        {"type": "audio", "url": "https://cdn.example.com/a.wav"},
    ]
}

TEST_EVENTS = "/api/relay/v1/test-events"


def send(stack: Stack, body: object) -> httpx.Response:
    return httpx.post(
        stack.api_url + TEST_EVENTS, json=body, headers={"x-api-key": RELAY_KEY}, timeout=30
    )


def test_a_test_event_is_signed_and_its_answer_reported(redis_url: str) -> None:
    receiver = Receiver(script=[202], extra_headers={"x-seen": "yes"})
    with relay_stack(redis_url, workers=0, receiver=receiver) as stack:
        answer = send(stack, {"url": stack.callback_url})
        assert answer.status_code == 200
        result = answer.json()
        assert result["delivered"] is True and result["status"] == 202 and result["error"] is None
        [callback] = receiver.received
        payload = Webhook(stack.webhook_secrets[0]).verify(callback.body, callback.headers)
        assert payload["type"] == "relay.test"
        assert callback.headers["webhook-id"] == result["webhook_id"]
        assert result["duration_ms"] >= 0


def test_a_failing_receiver_is_reported_not_raised(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0, receiver=Receiver(default=500)) as stack:
        result = send(stack, {"url": stack.callback_url}).json()
        assert result["delivered"] is False and result["status"] == 500


def test_a_refused_connection_is_classified(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        result = send(stack, {"url": f"http://127.0.0.1:{free_port()}/hook"}).json()
        assert result == {**result, "delivered": False, "status": None, "error": "refused"}


def test_a_hanging_receiver_is_a_timeout(redis_url: str) -> None:
    with relay_stack(
        redis_url, workers=0, receiver=Receiver(delay=3), env={"RELAY_DELIVERY_TIMEOUT": "0.5"}
    ) as stack:
        result = send(stack, {"url": stack.callback_url}).json()
        assert result["error"] == "timeout"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"url": "http://169.254.169.254/latest"}, 422),
        ({"url": "http://10.0.0.1/hook"}, 422),  # outside the tests' allow-list
        ({"url": "not a url"}, 422),
        ({}, 422),
        ({"url": "http://127.0.0.1/x", "more": 1}, 422),
    ],
)
def test_bad_targets_are_refused_before_anything_is_sent(
    redis_url: str, body: object, status: int
) -> None:
    receiver = Receiver()
    with relay_stack(redis_url, workers=0, receiver=receiver) as stack:
        answer = send(stack, body)
        assert answer.status_code == status
        assert receiver.received == []


def test_an_api_without_secrets_says_so(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0, env={"RELAY_WEBHOOK_SECRETS": ""}) as stack:
        answer = send(stack, {"url": stack.callback_url})
        assert answer.status_code == 503


def test_an_answer_that_breaks_http_is_a_protocol_failure_not_an_error_500(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Finding 8 of #24: aiohttp's error for 300 headers escaped the transport: a 500 and a
    # traceback in the log.
    receiver = Receiver(extra_headers={f"x-padding-{number}": "x" for number in range(300)})
    with relay_stack(redis_url, workers=0, receiver=receiver) as stack:
        answer = send(stack, {"url": stack.callback_url})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        **answer.json(),
        "delivered": False,
        "status": None,
        "error": "protocol",
    }
    assert [record.getMessage() for record in caplog.records if record.exc_info] == []


# --- Issue #24, finding 2: test events must not read internal services ---------------------

SECRET = b'{"db_password": "hunter2"}'
OTHER_KEY = "another-relay-key-0123456789"


def internal_service() -> Starlette:
    """A cluster service's secret, on loopback: answers any POST with it."""

    async def secret(request: Request) -> Response:
        return Response(SECRET, media_type="application/json")

    return Starlette(routes=[Route("/{path:path}", secret, methods=["POST"])])


def test_a_test_event_answers_without_the_receivers_reply(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0) as stack, serve(internal_service()) as service:
        answer = send(stack, {"url": service + "/secret"})
        assert answer.status_code == 200
        result = answer.json()
        assert result["delivered"] is True and result["status"] == 200
        assert "response_excerpt" not in result
        assert b"hunter2" not in answer.content


@contextlib.contextmanager
def hanging_up(*, reset: bool) -> Iterator[int]:
    """A TCP service that reads a request and closes without answering: with a reset (RST) or
    a plain close (as Redis does to an HTTP request). Yields its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def run() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                if reset:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


@pytest.mark.parametrize("reset", [True, False], ids=["rst", "close"])
def test_a_connection_closed_without_an_answer_is_reset(redis_url: str, reset: bool) -> None:
    with relay_stack(redis_url, workers=0) as stack, hanging_up(reset=reset) as port:
        result = send(stack, {"url": f"http://127.0.0.1:{port}/"}).json()
        assert result == {**result, "delivered": False, "status": None, "error": "reset"}


def test_test_events_are_rate_limited_per_caller(redis_url: str, tmp_path: Path) -> None:
    env = {**two_teams(tmp_path / "callers.json", OTHER_KEY), "RELAY_TEST_EVENTS_PER_MINUTE": "2"}
    receiver = Receiver()
    with relay_stack(redis_url, workers=0, receiver=receiver, env=env) as stack:
        assert [send(stack, {"url": stack.callback_url}).status_code for _ in range(2)] == [200] * 2
        refused = send(stack, {"url": stack.callback_url})
        assert refused.status_code == 429
        assert "RELAY_TEST_EVENTS_PER_MINUTE" in refused.json()["error"]
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert len(receiver.received) == 2
        other = httpx.post(
            stack.api_url + TEST_EVENTS,
            json={"url": stack.callback_url},
            headers={"x-api-key": OTHER_KEY},
        )
        assert other.status_code == 200


@pytest.mark.parametrize("path", [TEST_EVENTS, "/api/v1/lipsync/generate"])
def test_a_refused_host_name_is_not_told_apart_from_an_unknown_one(
    redis_url: str, path: str
) -> None:
    # Loopback is outside this allow-list: `localhost` resolves into a refused network, the
    # .invalid name does not resolve at all. The caller must not learn which, nor the address.
    env = {"RELAY_CALLBACK_ALLOWED_NETWORKS": "10.0.0.0/8"}
    with relay_stack(redis_url, workers=0, env=env) as stack:
        messages = []
        for host in ("localhost", "no-such-host.invalid"):
            url = f"http://{host}/hook"
            body = {"url": url} if path == TEST_EVENTS else {**GENERATE, "callback_url": url}
            answer = httpx.post(stack.api_url + path, json=body, headers={"x-api-key": RELAY_KEY})
            assert answer.status_code == 422
            messages.append(answer.json()["error"].replace(host, "HOST"))
        assert messages[0] == messages[1]
        assert "127.0.0.1" not in messages[0] and "::1" not in messages[0]
        assert "refused network" in messages[0]
