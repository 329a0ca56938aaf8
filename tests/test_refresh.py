"""Fresh output links on late attempts: an attempt at a final event made longer than
RELAY_REFRESH_AFTER after its job ended re-reads the job from Chamelaion first (#21 item 6)."""

from __future__ import annotations

import time
from typing import cast

import pytest
import redis

from relay.redis import keys
from tests.helpers import POLL_ROUTE, attempts, pin, post, submit, verified
from tests.stack import Stack, eventually, relay_stack

REFRESH_AFTER = 2.0
FRESH_URL = "https://storage.chamelaion.example/output/fresh.mp4?signature=renewed"


def late_redelivery(
    stack: Stack, fault: dict[str, object] | None = None
) -> tuple[dict[str, object], dict[str, object], list[str]]:
    """Submit a job, take its callback, let RELAY_REFRESH_AFTER pass, pin a new output_url in
    the sandbox (and set `fault` on its reads by id), redeliver; return both payloads, and both
    webhook-ids."""
    request_id = submit(stack, reference_id="late-one")
    [first] = stack.receiver.wait_for(1)
    eventually(lambda: attempts(stack, request_id))
    pin(stack, request_id, extra={"output_url": FRESH_URL})
    if fault is not None:  # set once the job ended: its polls must not meet it
        stack.upstream("POST", "/_sandbox/faults", json={**fault, "paths": POLL_ROUTE})
    time.sleep(REFRESH_AFTER + 0.5)  # the attempt below is late, by the relay's own measure
    assert post(stack, "/jobs/late-one/redeliver").status_code == 202
    second = stack.receiver.wait_for(2)[1]
    ids = [first.headers["webhook-id"], second.headers["webhook-id"]]
    return verified(stack, first), verified(stack, second), ids


def last_attempt(stack: Stack, request_id: str) -> dict[str, object]:
    log = eventually(lambda: (found := attempts(stack, request_id)) and len(found) == 3 and found)
    entry: dict[str, object] = log[2]
    assert entry["state"] == "delivered"
    return entry


def test_a_late_redelivery_carries_the_output_url_chamelaion_gives_now(redis_url: str) -> None:
    with relay_stack(redis_url, env={"RELAY_REFRESH_AFTER": str(REFRESH_AFTER)}) as stack:
        first, second, ids = late_redelivery(stack)
        request_id = str(first["data"]["id"])  # type: ignore[index]
        assert first["data"]["output_url"] != FRESH_URL  # type: ignore[index]
        assert second["data"]["output_url"] == FRESH_URL  # type: ignore[index]
        # Only the data is Chamelaion's newer answer: the event itself is the same one.
        assert ids[0] == ids[1]
        assert {k: v for k, v in second.items() if k != "data"} == {
            k: v for k, v in first.items() if k != "data"
        }
        entry = last_attempt(stack, request_id)
        assert entry["refresh"] == "refreshed"
        assert "refresh_error" not in entry


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ({"status": 500}, "HTTP 500"),
        ({"status": 429, "retry_after": 30}, "HTTP 429"),
    ],
)
def test_a_failed_re_read_sends_the_stored_object_and_says_so(
    redis_url: str, fault: dict[str, object], reason: str
) -> None:
    with relay_stack(redis_url, env={"RELAY_REFRESH_AFTER": str(REFRESH_AFTER)}) as stack:
        first, second, ids = late_redelivery(stack, fault)
        request_id = str(first["data"]["id"])  # type: ignore[index]
        assert second == first, "the stored object, as first sent"
        assert ids[0] == ids[1]
        entry = last_attempt(stack, request_id)
        assert entry["refresh"] == "failed"
        assert reason in str(entry["refresh_error"])
        fired = stack.upstream("GET", "/_sandbox/stats").json()["faults_fired"]
        assert fired[POLL_ROUTE] == {str(fault["status"]): 1}
        if fault["status"] == 429:
            # Like any other upstream call's 429: every process's calls pause.
            client = redis.Redis.from_url(redis_url)
            try:
                assert cast(int, client.pttl(keys.UPSTREAM_PAUSED)) > 0
            finally:
                client.close()


def test_an_attempt_soon_after_the_end_reads_nothing_more(redis_url: str) -> None:
    with relay_stack(redis_url) as stack:  # the default RELAY_REFRESH_AFTER
        request_id = submit(stack, reference_id="prompt-one")
        [first] = stack.receiver.wait_for(1)
        eventually(lambda: attempts(stack, request_id))
        pin(stack, request_id, extra={"output_url": FRESH_URL})
        assert post(stack, "/jobs/prompt-one/redeliver").status_code == 202
        second = stack.receiver.wait_for(2)[1]
        assert verified(stack, second) == verified(stack, first)
        assert "refresh" not in last_attempt(stack, request_id)
