"""Polling against an upstream that misbehaves: odd data, lost requests, 429s, a shared budget."""

from __future__ import annotations

import itertools
import time

import orjson
import redis
from standardwebhooks import Webhook

from relay.redis import keys
from tests.helpers import CREATE_ROUTE, SLOW, pin, read_times, relay_view, submit
from tests.stack import Receiver, eventually, job_field, relay_stack


def test_unknown_status_and_odd_fields_never_break_a_poll(redis_url: str) -> None:
    with relay_stack(redis_url, sandbox=SLOW) as stack:
        request_id = submit(stack)
        pin(
            stack,
            request_id,
            status="reviewing",
            extra={"created_at": "yesterday-ish", "eta": None},
        )
        eventually(lambda: relay_view(stack, request_id).get("status") == "reviewing")
        assert relay_view(stack, request_id)["created_at"] == "yesterday-ish"
        assert stack.receiver.received == []

        pin(
            stack,
            request_id,
            status="completed",
            extra={"finished_at": "not a time"},
            drop=["output_url", "started_at"],
        )
        [callback] = stack.receiver.wait_for(1)
        payload = Webhook(stack.webhook_secrets[0]).verify(callback.body, callback.headers)
        assert payload["type"] == "lipsync.completed"
        assert payload["data"]["finished_at"] == "not a time"
        assert "output_url" not in payload["data"]


def test_a_request_upstream_forgets_ends_as_failed_after_the_grace_period(redis_url: str) -> None:
    with relay_stack(redis_url, sandbox=SLOW, env={"RELAY_NOT_FOUND_GRACE": "1"}) as stack:
        request_id = submit(stack)
        eventually(lambda: relay_view(stack, request_id).get("status") == "queued")
        assert stack.upstream("POST", f"/_sandbox/requests/{request_id}/forget").status_code == 200
        [callback] = stack.receiver.wait_for(1)
        payload = orjson.loads(callback.body)
        assert payload["type"] == "lipsync.failed"
        assert payload["data"]["id"] == request_id
        assert "404" in payload["data"]["error_message"]
        assert relay_view(stack, request_id)["status"] == "failed"


def test_transient_upstream_errors_only_delay_the_job(redis_url: str) -> None:
    with relay_stack(redis_url) as stack:
        stack.upstream(
            "POST", "/_sandbox/faults", json={"status": 500, "count": 3, "paths": "poll"}
        )
        submit(stack)
        [callback] = stack.receiver.wait_for(1)
        assert orjson.loads(callback.body)["type"] == "lipsync.completed"


def test_a_429_pauses_every_worker_for_its_retry_after(redis_url: str) -> None:
    with relay_stack(redis_url, sandbox=SLOW, workers=2) as stack:
        for _ in range(4):
            submit(stack)
        eventually(lambda: len(read_times(stack)) >= 2, timeout=60)  # polls are flowing
        stack.upstream(
            "POST",
            "/_sandbox/faults",
            json={"status": 429, "count": 1, "retry_after": 2, "paths": "poll"},
        )
        # The 429 was answered before a worker paused everyone; once the pause is seen, wait
        # for a read 2 s later still, so the whole pause window lies between recorded reads.
        client = redis.Redis.from_url(redis_url)
        try:
            eventually(lambda: client.exists(keys.UPSTREAM_PAUSED))
        finally:
            client.close()
        paused_seen = time.monotonic()
        stamps: list[float] = eventually(
            lambda: (times := read_times(stack)) and times[-1] > paused_seen + 2.0 and times
        )
        gaps = [later - earlier for earlier, later in itertools.pairwise(stamps)]
        assert max(gaps) >= 1.9, "after a 429 with Retry-After: 2 nobody polls for 2 s"


WINDOW = 5.0  # seconds of reads measured


def test_all_workers_together_stay_inside_the_upstream_rate(redis_url: str) -> None:
    rate = 5.0
    env = {
        "RELAY_UPSTREAM_RATE_LIMIT": str(rate),
        "RELAY_POLL_MIN_INTERVAL": "0.1",
        "RELAY_POLL_MAX_INTERVAL": "0.1",
        "RELAY_SWEEP_INTERVAL": "0",  # per-id polls only: they alone would want far more
    }
    with relay_stack(redis_url, sandbox=SLOW, workers=2, env=env) as stack:
        for _ in range(10):
            submit(stack)

        # Both workers up and polling, and the submissions' bookings of the budget spent: until
        # then, polls have only the status reads' share of it.
        created = stack.upstream("GET", "/_sandbox/stats").json()["timestamps"][CREATE_ROUTE]
        first = max(eventually(lambda: read_times(stack))[0], max(created))
        # Reads are recorded in order: one at or past the window's end closes it.
        window_closed = eventually(
            lambda: (times := read_times(stack)) and times[-1] >= first + WINDOW and times,
            timeout=30,
        )
        stamps = [t for t in window_closed if first <= t < first + WINDOW]
    # 10 jobs due every 0.1 s want 100 polls/s; the budget allows 5/s for everyone (both its
    # parts, each a burst of 1), list pages included. Counted over the whole window: the reads
    # are stamped as they arrive, and a loaded machine's delays bunch some of them (two a few
    # ms apart that the relay sent a period apart), which no budget can prevent; over the
    # window, delays move only the reads at its edges in or out of it.
    assert len(stamps) <= rate * WINDOW + 2, f"{len(stamps)} reads in {WINDOW} s"
    # Each claim that comes late (a loaded event loop) loses its lateness, so how close to the
    # budget the reads come depends on the machine: 23 of 25 beside a CPU hog.
    assert len(stamps) >= 0.6 * rate * WINDOW, "the budget is used, not starved"


def test_jobs_without_callback_are_tracked_and_served(redis_url: str) -> None:
    with relay_stack(redis_url, receiver=Receiver()) as stack:
        result = stack.sdk().lipsync.generate(
            inputs=[
                {"type": "video", "url": "https://x.example/v.mp4"},
                {"type": "audio", "url": "https://x.example/a.wav"},
            ]
        )
        request_id = result.request_id
        eventually(lambda: job_field(redis_url, request_id, "delivery") == b"none")
        ttl = redis.Redis.from_url(redis_url).ttl(keys.job(request_id))
        assert isinstance(ttl, int) and ttl > 0, "ended jobs expire after the retention period"
        calls = stack.upstream("GET", "/_sandbox/stats").json()["calls"]
        assert relay_view(stack, request_id)["status"] == "completed"
        assert stack.upstream("GET", "/_sandbox/stats").json()["calls"] == calls
        assert stack.receiver.received == []


def test_a_job_unfinished_past_the_maximum_age_ends_as_failed(redis_url: str) -> None:
    with relay_stack(redis_url, sandbox=SLOW, env={"RELAY_MAX_JOB_AGE": "1"}) as stack:
        request_id = submit(stack)
        [callback] = stack.receiver.wait_for(1)
        payload = orjson.loads(callback.body)
        assert payload["type"] == "lipsync.failed"
        assert payload["data"]["id"] == request_id
        assert "did not finish" in payload["data"]["error_message"]
