"""Test events: a signed `relay.test` sent now, and what the receiver answered."""

from __future__ import annotations

import httpx
import pytest
from standardwebhooks import Webhook

from relay.devtools.embedded_redis import free_port
from tests.stack import RELAY_KEY, Receiver, Stack, relay_stack

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
