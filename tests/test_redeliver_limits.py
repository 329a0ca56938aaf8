"""Redeliver and recover within limits (#24 finding 9): per-caller rate limits, a recover that
leaves a delivery already pending to its schedule, and an attempt log that keeps a delivery's
first attempts however many redeliveries follow."""

from __future__ import annotations

from pathlib import Path

import httpx

from relay.delivery.attempt_log import MAX_ENTRIES
from tests.helpers import ADMIN_KEY, B_KEY, RELAY_API, attempts, post, submit, three_callers
from tests.stack import RELAY_KEY, Receiver, Stack, eventually, job_field, relay_stack

# The entries a trimmed attempt log keeps from its start (the rest: its newest).
KEEP_FIRST = 10


def test_recover_leaves_a_delivery_already_pending_to_its_schedule(redis_url: str) -> None:
    receiver = Receiver(default=500)
    env = {"RELAY_DELIVERY_RETRY_SCHEDULE": "0,600"}
    with relay_stack(redis_url, receiver=receiver, env=env) as stack:
        request_id = submit(stack)
        receiver.wait_for(1)
        eventually(lambda: job_field(redis_url, request_id, "attempt") == b"1")
        eventually(lambda: attempts(stack, request_id))
        answer = post(stack, "/deliveries/recover", {"since": 0, "states": ["failing"]})
        assert answer.status_code == 200, answer.text
        assert answer.json() == {**answer.json(), "requeued": 0, "already_pending": 1}
        # Its schedule goes on: the awaited attempt and its start are unchanged.
        assert job_field(redis_url, request_id, "attempt") == b"1"
        assert job_field(redis_url, request_id, "schedule_base") in (None, b"0")


def test_recover_and_redeliver_are_rate_limited_per_caller(redis_url: str) -> None:
    env = {"RELAY_RECOVERS_PER_MINUTE": "2", "RELAY_REDELIVERIES_PER_MINUTE": "3"}
    with relay_stack(redis_url, workers=0, env=env) as stack:
        request_id = submit(stack)  # no worker: it never ends, so redeliver answers 409
        for _ in range(3):
            assert post(stack, f"/jobs/{request_id}/redeliver").status_code == 409
        refused = post(stack, f"/jobs/{request_id}/redeliver")
        assert refused.status_code == 429
        assert "RELAY_REDELIVERIES_PER_MINUTE" in refused.json()["error"]
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        for _ in range(2):
            assert post(stack, "/deliveries/recover", {"since": 0}).status_code == 200
        refused = post(stack, "/deliveries/recover", {"since": 0})
        assert refused.status_code == 429
        assert "RELAY_RECOVERS_PER_MINUTE" in refused.json()["error"]
        assert 1 <= int(refused.headers["retry-after"]) <= 60


def test_the_attempt_log_keeps_its_first_attempts_when_trimmed(redis_url: str) -> None:
    env = {"RELAY_REDELIVERIES_PER_MINUTE": "1000"}
    with relay_stack(redis_url, env=env) as stack:
        request_id = submit(stack)
        stack.receiver.wait_for(1)
        [first] = eventually(lambda: attempts(stack, request_id))
        assert first["attempt"] == 0 and first["status"] == 200
        for _ in range(MAX_ENTRIES + 20):
            assert post(stack, f"/jobs/{request_id}/redeliver").status_code == 202
        log = attempts(stack, request_id)
        assert len(log) <= MAX_ENTRIES
        # The real first attempt is still there, then a count of what was left out, then the
        # newest entries.
        assert log[0] == first
        marker = log[KEEP_FIRST]
        assert int(str(marker["dropped"])) >= 20
        assert "left out" in str(marker["note"])
        assert log[-1].get("note") == "redelivery requested" or log[-1].get("status") == 200


def post_as(stack: Stack, key: str, path: str, body: object = None) -> httpx.Response:
    return httpx.post(stack.api_url + RELAY_API + path, json=body, headers={"x-api-key": key})


def test_recovering_gone_deliveries_is_for_admins(redis_url: str, tmp_path: Path) -> None:
    # A receiver that answered 410 asked for no more; a caller cannot overrule that.
    with relay_stack(redis_url, workers=0, env=three_callers(tmp_path / "callers.json")) as stack:
        refused = post_as(stack, RELAY_KEY, "/deliveries/recover", {"since": 0, "states": ["gone"]})
        assert refused.status_code == 403
        assert "admin" in refused.json()["error"]
        mixed = {"since": 0, "states": ["failed", "gone"]}
        assert post_as(stack, B_KEY, "/deliveries/recover", mixed).status_code == 403
        allowed = post_as(stack, ADMIN_KEY, "/deliveries/recover", {"since": 0, "states": ["gone"]})
        assert allowed.status_code == 200, allowed.text


def test_one_callers_allowance_is_its_own(redis_url: str, tmp_path: Path) -> None:
    env = {**three_callers(tmp_path / "callers.json"), "RELAY_RECOVERS_PER_MINUTE": "1"}
    with relay_stack(redis_url, workers=0, env=env) as stack:
        assert post_as(stack, RELAY_KEY, "/deliveries/recover", {"since": 0}).status_code == 200
        assert post_as(stack, RELAY_KEY, "/deliveries/recover", {"since": 0}).status_code == 429
        assert post_as(stack, B_KEY, "/deliveries/recover", {"since": 0}).status_code == 200
