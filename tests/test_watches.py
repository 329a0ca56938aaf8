"""Watching a job submitted to Chamelaion directly: called back like one of the relay's own."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers import AUDIO, VIDEO, verified
from tests.stack import RELAY_KEY, Stack, relay_stack

WATCHES = "/api/relay/v1/watches"


def direct_job(stack: Stack, reference_id: str | None = None) -> str:
    body: dict[str, object] = {
        "inputs": [{"type": "video", "url": VIDEO}, {"type": "audio", "url": AUDIO}]
    }
    if reference_id:
        body["reference_id"] = reference_id
    request_id: str = stack.upstream("POST", "/api/v1/lipsync/generate", json=body).json()[
        "request_id"
    ]
    return request_id


def watch(stack: Stack, body: object) -> httpx.Response:
    return httpx.post(stack.api_url + WATCHES, json=body, headers={"x-api-key": RELAY_KEY})


@pytest.mark.parametrize("by", ["request_id", "reference_id"])
def test_a_watched_job_is_called_back_with_its_final_state(redis_url: str, by: str) -> None:
    with relay_stack(redis_url) as stack:
        request_id = direct_job(stack, reference_id="made-elsewhere")
        name = request_id if by == "request_id" else "made-elsewhere"
        answer = watch(
            stack,
            {by: name, "callback_url": stack.callback_url, "callback_metadata": {"from": "cli"}},
        )
        assert answer.status_code == 201
        assert answer.json() == {"request_id": request_id, "watching": True, "created": True}
        [callback] = stack.receiver.wait_for(1)
        payload = verified(stack, callback)
        assert payload["type"] == "lipsync.completed"
        assert payload["metadata"] == {"from": "cli"}
        final = stack.upstream("GET", f"/api/v1/lipsync/requests/{request_id}").json()
        assert payload["data"] == final


def test_watching_again_is_idempotent_and_another_callback_is_409(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        request_id = direct_job(stack)
        body = {"request_id": request_id, "callback_url": stack.callback_url}
        assert watch(stack, body).status_code == 201
        again = watch(stack, body)
        assert again.status_code == 200 and again.json()["created"] is False
        other = watch(stack, {**body, "callback_url": stack.callback_url + "/other"})
        assert other.status_code == 409


def test_an_unknown_job_is_404_and_nothing_is_tracked(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        answer = watch(stack, {"request_id": "no-such-job", "callback_url": stack.callback_url})
        assert answer.status_code == 404
        assert answer.json() == {"error": "Chamelaion does not know this request"}
        status = httpx.get(
            stack.api_url + "/api/v1/lipsync/requests/no-such-job",
            headers={"x-api-key": RELAY_KEY},
        )
        assert status.status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        {"callback_url": "http://127.0.0.1/hook"},
        {"request_id": "a", "reference_id": "b", "callback_url": "http://127.0.0.1/hook"},
        {"request_id": "a"},
        {"request_id": "a", "callback_url": "ftp://example.com/x"},
        {"request_id": "a", "callback_url": "http://127.0.0.1/hook", "extra": 1},
        {"request_id": "x" * 300, "callback_url": "http://127.0.0.1/hook"},
        [],
    ],
)
def test_bad_watch_requests_are_4xx(redis_url: str, body: object) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        answer = watch(stack, body)
        assert answer.status_code == 422, answer.text
        assert "error" in answer.json()


def test_a_refused_callback_target_is_422(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        request_id = direct_job(stack)
        answer = watch(
            stack, {"request_id": request_id, "callback_url": "http://169.254.169.254/x"}
        )
        assert answer.status_code == 422
        assert "callback_url refused" in answer.json()["error"]
