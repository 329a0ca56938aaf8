"""Many callbacks at once: slow and failing receivers cost only their own deliveries.

Real parts only: the relay stack (sandbox upstream, API, a worker, Redis) and
receivers on loopback; every callback is verified with `standardwebhooks`.
"""

from __future__ import annotations

import orjson
import pytest
import redis
from arq.jobs import deserialize_result

from relay.redis import keys
from tests.helpers import SLOW, submit_many, verified
from tests.servers import serve
from tests.stack import Receiver, Stack, eventually, job_field, relay_stack


def delivered_once_each(stack: Stack, receiver: Receiver, request_ids: list[str]) -> None:
    """Every job's event arrived, verified, under its own webhook-id."""
    by_job: dict[str, set[str]] = {}
    for callback in receiver.received:
        payload = verified(stack, callback)
        data = payload["data"]
        assert isinstance(data, dict)
        by_job.setdefault(data["id"], set()).add(callback.headers["webhook-id"])
    assert set(by_job) == set(request_ids)
    assert all(len(ids) == 1 for ids in by_job.values())
    assert len({next(iter(ids)) for ids in by_job.values()}) == len(request_ids)


@pytest.mark.long
def test_hanging_receivers_do_not_hold_up_the_others(redis_url: str) -> None:
    hanging = Receiver(delay=4.0)
    env = {"RELAY_DELIVERY_TIMEOUT": "8", "RELAY_DESTINATION_CONCURRENCY": "2"}
    with serve(hanging.app()) as hanging_url, relay_stack(redis_url, env=env) as stack:
        slow_ids = submit_many(stack, hanging_url + "/hook", 6)
        fast_ids = submit_many(stack, stack.callback_url, 40)
        stack.receiver.wait_for(40, timeout=30)
        # Every fast receiver got its callback while the hanging one had answered at most the
        # first of its capped deliveries: nothing fast waited behind it.
        assert hanging.answered <= 2
        assert hanging.max_in_flight <= 2, "the destination's cap holds"
        delivered_once_each(stack, stack.receiver, fast_ids)
        hanging.wait_for(6, timeout=60)
        eventually(lambda: hanging.answered == 6, timeout=30)
        assert hanging.max_in_flight == 2
        delivered_once_each(stack, hanging, slow_ids)
        eventually(
            lambda: all(
                job_field(redis_url, rid, "delivery") == b"delivered" for rid in fast_ids + slow_ids
            )
        )


# A destination backed off after three failures, for a second at most; eight attempts 0.2 s
# apart, a schedule that would run out long before the receiver recovers, were the postponed
# attempts counted. Each back-off's probe is an attempt, and counts: with four attempts, one
# job in ten that happened to be the probe three times ran out.
ATTEMPTS = 8
BACKING_OFF = {
    "RELAY_DESTINATION_FAILURES": "3",
    "RELAY_DESTINATION_MAX_BACKOFF": "1",
    "RELAY_DELIVERY_RETRY_SCHEDULE": ",".join(["0"] + ["0.2"] * (ATTEMPTS - 1)),
}


def recovered(redis_url: str, receiver: Receiver, request_ids: list[str]) -> None:
    """The receiver answers again: every job is delivered, none past its schedule (attempts
    postponed while the destination was backed off were not counted)."""
    receiver.default = 204
    eventually(
        lambda: all(job_field(redis_url, rid, "delivery") == b"delivered" for rid in request_ids),
        timeout=60,
    )
    for request_id in request_ids:
        made = int(job_field(redis_url, request_id, "attempts_made") or 0)
        assert 1 <= made <= ATTEMPTS


def test_a_failing_destination_is_backed_off_and_gets_every_event_once_it_recovers(
    redis_url: str,
) -> None:
    receiver = Receiver(default=503)
    with relay_stack(redis_url, receiver=receiver, env=BACKING_OFF) as stack:
        request_ids = submit_many(stack, stack.callback_url, 10)
        client = redis.Redis.from_url(redis_url)
        eventually(lambda: client.zcard(keys.BACKED_OFF) == 1)
        eventually(lambda: "relay_destinations_backed_off 1.0" in stack.worker_metrics())
        tries_while_failing = len(receiver.received)
        eventually(lambda: len(receiver.received) > tries_while_failing + 3, timeout=20)
        recovered(redis_url, receiver, request_ids)
        delivered = [c for c in receiver.received if c.at >= 0]
        ok_ids = {orjson.loads(c.body)["data"]["id"] for c in delivered}
        assert ok_ids == set(request_ids)
        for callback in delivered:
            verified(stack, callback)
        ids_per_job: dict[str, set[str]] = {}
        for callback in delivered:
            job_id = orjson.loads(callback.body)["data"]["id"]
            ids_per_job.setdefault(job_id, set()).add(callback.headers["webhook-id"])
        assert all(len(ids) == 1 for ids in ids_per_job.values()), "retries keep the id"
        # The destination answered again: its breaker is closed.
        eventually(lambda: client.zcard(keys.BACKED_OFF) == 0)
        text = stack.worker_metrics()
        postponed = 'relay_deliveries_total{outcome="postponed"} '
        assert any(
            line.startswith(postponed) and float(line.split()[1]) >= 1 for line in text.splitlines()
        )
        assert "relay_destinations_backed_off 0.0" in text


def test_a_backed_off_destination_is_probed_by_one_attempt_at_a_time(redis_url: str) -> None:
    # The receiver takes 0.5 s to fail: the attempts falling due as a back-off ends would all
    # be sent (and counted) in that time, were each let through until a failure is recorded.
    # Half-open, the destination gets one probe; the others are postponed, not counted.
    receiver = Receiver(default=503, delay=0.5)
    with relay_stack(redis_url, receiver=receiver, env=BACKING_OFF) as stack:
        request_ids = submit_many(stack, stack.callback_url, 10)
        client = redis.Redis.from_url(redis_url)
        eventually(lambda: client.zcard(keys.BACKED_OFF) == 1)
        # The attempts in flight as it opened have had their answers.
        eventually(lambda: receiver.in_flight == 0 and len(receiver.received) >= 3)
        with receiver.lock:
            receiver.max_in_flight = 0
            after_opening = len(receiver.received)
        # Three back-offs end, each tried by a probe that fails.
        eventually(lambda: len(receiver.received) >= after_opening + 3, timeout=20)
        assert receiver.max_in_flight == 1, "more than one attempt tried a half-open destination"
        recovered(redis_url, receiver, request_ids)


@pytest.mark.long
def test_a_burst_past_the_in_process_limit_waits_its_turn_and_all_arrive(redis_url: str) -> None:
    # One attempt in flight per worker, so at most two first attempts run in-process; the rest
    # of the burst waits as ids. Each send takes 2 s, so the later ones wait long enough that
    # their guards (due 4 + 10 s after the end) come close: those are left to arq, never made
    # by both. Every event arrives exactly once either way.
    slow = Receiver(delay=2.0)
    env = {"RELAY_DELIVERY_CONCURRENCY": "1", "RELAY_DELIVERY_TIMEOUT": "4"}
    with (
        serve(slow.app()) as slow_url,
        relay_stack(redis_url, env=env, sandbox=SLOW) as stack,
    ):
        request_ids = submit_many(stack, slow_url + "/hook", 8)
        eventually(lambda: all(job_field(redis_url, rid, "polled") for rid in request_ids))
        # They all end at one instant, seen by one sweep: a burst. (Pinned one by one, on a
        # loaded machine a sweep could see some before the rest, and the last ones no longer
        # waited long enough to be left to arq.)
        stack.upstream("POST", "/_sandbox/finish", json={"ids": request_ids}).raise_for_status()
        eventually(lambda: waiting(stack) >= 4)  # held as ids, past the two running
        slow.wait_for(8, timeout=90)
        delivered_once_each(stack, slow, request_ids)
        client = redis.Redis.from_url(redis_url)
        try:
            results: list[bytes | None] = [
                client.get(keys.ARQ_RESULT_PREFIX + keys.delivery_job_id(rid, 0))  # type: ignore[misc]
                for rid in request_ids
            ]
        finally:
            client.close()
        # A first attempt arq made itself says "delivered"; one made in-process leaves no result
        # (recording it removed its guard).
        by_arq = [r for r in results if r and deserialize_result(r).result == "delivered"]
        assert 1 <= len(by_arq) < len(request_ids), f"{len(by_arq)} of 8 made by arq"
        assert waiting(stack) == 0


def waiting(stack: Stack) -> float:
    for line in stack.worker_metrics().splitlines():
        if line.startswith("relay_first_attempts_waiting "):
            return float(line.split()[1])
    raise AssertionError("relay_first_attempts_waiting is not reported")
