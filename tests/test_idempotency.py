"""Idempotency-Key on both submit routes: one upstream job per key, whatever the retries."""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.stack import RELAY_KEY, Stack, eventually, relay_stack
from tests.test_end_to_end import AUDIO, VIDEO

BODY = {
    "inputs": [{"type": "video", "url": VIDEO}, {"type": "audio", "url": AUDIO}],
    "reference_id": "idem-1",
}


def upstream_jobs(stack: Stack) -> int:
    total: int = stack.upstream("GET", "/api/v1/lipsync/requests").json()["pagination"]["total"]
    return total


def post(
    stack: Stack, key: str | None, body: object = BODY, *, api_key: str = RELAY_KEY
) -> httpx.Response:
    headers = {"x-api-key": api_key}
    if key is not None:
        headers["idempotency-key"] = key
    return httpx.post(stack.api_url + "/api/v1/lipsync/generate", json=body, headers=headers)


def test_the_sdk_retrying_with_one_key_creates_one_job(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        client = stack.sdk()
        answers = [
            client.lipsync.generate(
                inputs=BODY["inputs"],  # type: ignore[arg-type]
                reference_id="idem-1",
                extra_headers={"Idempotency-Key": "order-42"},
            )
            for _ in range(3)
        ]
        assert len({answer.request_id for answer in answers}) == 1
        assert upstream_jobs(stack) == 1
        replay = post(stack, "order-42")
        assert replay.status_code == 200
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.json()["request_id"] == answers[0].request_id
        # Without a key, or with another one, a new job is made as before.
        assert post(stack, None).status_code == 200
        assert post(stack, "order-43").status_code == 200
        assert upstream_jobs(stack) == 3


def test_the_same_key_with_another_body_is_422(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        assert post(stack, "k").status_code == 200
        other = post(stack, "k", {**BODY, "reference_id": "idem-2"})
        assert other.status_code == 422
        assert "Idempotency-Key" in other.json()["error"]
        assert upstream_jobs(stack) == 1


def test_keys_are_scoped_per_caller(redis_url: str) -> None:
    second_key = "another-relay-key-0123456789"
    with relay_stack(
        redis_url, workers=0, env={"RELAY_API_KEYS": f"{RELAY_KEY},{second_key}"}
    ) as stack:
        first = post(stack, "shared")
        # Another caller's same key neither replays the first caller's answer nor is refused.
        second = post(stack, "shared", api_key=second_key)
        assert first.status_code == second.status_code == 200
        assert first.json()["request_id"] != second.json()["request_id"]
        assert "idempotent-replayed" not in second.headers
        assert upstream_jobs(stack) == 2


def test_a_retry_while_the_first_is_in_flight_is_409(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        stack.upstream(
            "POST", "/_sandbox/faults", json={"paths": "generate", "delay": 1.5, "count": 1}
        )
        first: list[httpx.Response] = []
        thread = threading.Thread(target=lambda: first.append(post(stack, "slow")))
        thread.start()
        eventually(lambda: stack.upstream("GET", "/_sandbox/stats").json()["calls"])
        racing = post(stack, "slow")
        thread.join()
        assert racing.status_code == 409
        assert racing.headers["retry-after"] == "1"
        assert first[0].status_code == 200
        assert post(stack, "slow").json() == first[0].json()
        assert upstream_jobs(stack) == 1


def test_a_retryable_failure_releases_the_key(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        stack.upstream(
            "POST", "/_sandbox/faults", json={"paths": "generate", "status": 500, "count": 1}
        )
        assert post(stack, "again").status_code == 502
        retried = post(stack, "again")
        assert retried.status_code == 200
        assert "idempotent-replayed" not in retried.headers
        assert upstream_jobs(stack) == 1


def test_a_refused_body_is_replayed_as_refused(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        bad: dict[str, object] = {"inputs": []}
        assert post(stack, "bad", bad).status_code == 422
        replay = post(stack, "bad", bad)
        assert replay.status_code == 422 and replay.headers["idempotent-replayed"] == "true"


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "tab\there"])
def test_bad_keys_are_400(redis_url: str, key: str) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        headers = {b"x-api-key": RELAY_KEY.encode(), b"idempotency-key": key.encode()}
        answer = httpx.post(stack.api_url + "/api/v1/lipsync/generate", json=BODY, headers=headers)
        assert answer.status_code == 400
        assert "Idempotency-Key" in answer.json()["error"]
        assert upstream_jobs(stack) == 0


def test_uploads_replay_by_key_once_the_first_completed(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        files = {
            "video": ("a.mp4", b"v" * 1000, "video/mp4"),
            "audio": ("a.wav", b"a" * 500, "audio/wav"),
        }
        headers = {"x-api-key": RELAY_KEY, "idempotency-key": "upload-1"}
        url = stack.api_url + "/api/v1/lipsync/generate-with-media"
        first = httpx.post(url, files=files, headers=headers)
        second = httpx.post(url, files=files, headers=headers)
        assert first.status_code == second.status_code == 200
        assert second.headers["idempotent-replayed"] == "true"
        assert first.json() == second.json()
        assert upstream_jobs(stack) == 1
