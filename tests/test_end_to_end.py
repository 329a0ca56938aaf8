"""The product promise, end to end: the official SDK submits through the relay, the sandbox runs
the job, and a receiver verifies the signed callback with `standardwebhooks`."""

from __future__ import annotations

import signal
import time

import httpx
import orjson
import pytest
import redis

from relay.redis import keys
from tests.helpers import submit, verified
from tests.stack import Receiver, eventually, job_field, job_fields, relay_stack


def test_completed_job_calls_back_with_the_upstream_final_state(redis_url: str) -> None:
    with relay_stack(redis_url) as stack:
        request_id = submit(stack, reference_id="dub-episode-42")
        [callback] = stack.receiver.wait_for(1)
        payload = verified(stack, callback)

        final = stack.upstream("GET", f"/api/v1/lipsync/requests/{request_id}").json()
        assert payload["type"] == "lipsync.completed"
        assert payload["data"] == final
        assert final["status"] == "completed" and final["reference_id"] == "dub-episode-42"
        assert isinstance(payload["timestamp"], str) and payload["timestamp"].endswith("Z")
        # The relay only forwarded what Chamelaion documents.
        sent = stack.upstream("GET", f"/_sandbox/requests/{request_id}/body").json()
        assert "callback_url" not in sent

        # Internal pollers now read the relay's own state, by id and by reference_id.
        sdk = stack.sdk()
        by_id = sdk.lipsync.requests.with_raw_response.retrieve(request_id)
        by_ref = sdk.lipsync.requests.with_raw_response.retrieve("dub-episode-42")
        assert by_id.http_response.json() == by_ref.http_response.json() == final
        assert by_id.parse().status == "completed"
        before = stack.upstream("GET", "/_sandbox/stats").json()["calls"]
        sdk.lipsync.requests.retrieve(request_id)
        after = stack.upstream("GET", "/_sandbox/stats").json()["calls"]
        assert before == after, "a tracked job's status must not be fetched from upstream"

        time.sleep(0.5)
        assert len(stack.receiver.received) == 1, "a delivered callback is not sent again"


def test_failed_job_calls_back_with_lipsync_failed(redis_url: str) -> None:
    with relay_stack(redis_url) as stack:
        request_id = submit(stack, video="https://cdn.example.com/fail.mp4")
        [callback] = stack.receiver.wait_for(1)
        payload = verified(stack, callback)
        assert payload["type"] == "lipsync.failed"
        data = payload["data"]
        assert isinstance(data, dict)
        assert data["id"] == request_id and data["status"] == "failed"
        assert data["error_message"] == "video URL is not accessible"


def test_receiver_failing_twice_gets_the_same_event_until_it_succeeds(redis_url: str) -> None:
    receiver = Receiver(script=[500, 503])
    with relay_stack(redis_url, receiver=receiver) as stack:
        request_id = submit(stack)
        callbacks = receiver.wait_for(3)
        # The receiver records a callback before it answers: the worker records the outcome after.
        eventually(lambda: job_field(redis_url, request_id, "delivery") == b"delivered")
        time.sleep(1.0)
        assert len(receiver.received) == 3, "delivery stops after the first success"
        ids = {callback.headers["webhook-id"] for callback in callbacks}
        assert len(ids) == 1
        bodies = [verified(stack, callback) for callback in callbacks]
        assert bodies[0] == bodies[1] == bodies[2]
        assert callbacks[1].at - callbacks[0].at >= 0.25, "retries wait for the schedule"
        job = job_fields(redis_url, request_id)
        assert job[b"delivery"] == b"delivered"
        assert job[b"attempts_made"] == b"3"


def test_receiver_answering_410_is_never_called_again(redis_url: str) -> None:
    receiver = Receiver(default=410)
    with relay_stack(redis_url, receiver=receiver) as stack:
        request_id = submit(stack)
        receiver.wait_for(1)
        eventually(lambda: job_field(redis_url, request_id, "delivery") == b"gone")
        time.sleep(1.5)
        assert len(receiver.received) == 1


def test_redirects_are_failures_and_never_followed(redis_url: str) -> None:
    receiver = Receiver(script=[302], extra_headers={"location": "/elsewhere"})
    with relay_stack(redis_url, receiver=receiver) as stack:
        request_id = submit(stack)
        callbacks = receiver.wait_for(2)
        eventually(lambda: job_field(redis_url, request_id, "delivery") == b"delivered")
        assert callbacks[0].headers["webhook-id"] == callbacks[1].headers["webhook-id"]
        assert job_field(redis_url, request_id, "attempts_made") == b"2"


def test_retry_schedule_runs_out_and_the_delivery_is_marked_failed(redis_url: str) -> None:
    receiver = Receiver(default=500)
    with relay_stack(redis_url, receiver=receiver) as stack:
        request_id = submit(stack)
        receiver.wait_for(4)
        eventually(lambda: job_field(redis_url, request_id, "delivery") == b"failed")
        time.sleep(0.8)
        assert len(receiver.received) == 4, "exactly one attempt per schedule entry"


@pytest.mark.long
def test_a_sigkilled_worker_loses_nothing(redis_url: str) -> None:
    """Kill a worker in the middle of polls and of a delivery; a second one finishes all."""
    receiver = Receiver(delay=5.0)  # the first delivery hangs past the kill
    env = {"RELAY_POLL_LEASE": "3", "RELAY_DELIVERY_TIMEOUT": "1"}
    with relay_stack(redis_url, receiver=receiver, env=env, processes=True) as stack:
        request_ids = [submit(stack) for _ in range(5)]
        victim = stack.workers[0]
        receiver.wait_for(1, timeout=20)  # a delivery is in flight now
        assert stack.stop_worker(victim, signal.SIGKILL) == -signal.SIGKILL
        receiver.delay = 0.0
        stack.start_worker(**env)

        def everyone_delivered() -> bool:
            states = [job_field(redis_url, rid, "delivery") for rid in request_ids]
            return all(state == b"delivered" for state in states)

        eventually(everyone_delivered, timeout=45)
        delivered_ids = {
            orjson.loads(callback.body)["data"]["id"] for callback in receiver.received
        }
        assert delivered_ids == set(request_ids)
        assert redis.Redis.from_url(redis_url).zcard(keys.POLLS) == 0


def metric(text: str, name: str) -> float:
    """A sample's value; 0 when not exposed yet (labelled counters appear on first use)."""
    for line in text.splitlines():
        sample, _, value = line.partition(" ")
        if sample == name:
            return float(value)
    return 0.0


def test_metrics_show_submissions_outstanding_work_and_deliveries(redis_url: str) -> None:
    generated = 'relay_upstream_calls_total{endpoint="lipsync/generate",status="200"}'
    with relay_stack(redis_url) as stack:
        # The API runs in this process, whose counters earlier tests have moved: use deltas.
        before = httpx.get(stack.api_url + "/metrics").text
        submit(stack)
        stack.receiver.wait_for(1)
        api = httpx.get(stack.api_url + "/metrics").text
        for name in ('relay_jobs_submitted_total{caller="default"}', generated):
            assert metric(api, name) - metric(before, name) == 1, name
        assert "relay_outstanding_jobs 0.0" in api
        assert "relay_due_work 0.0" in api

        def delivered() -> bool:
            worker = stack.worker_metrics()
            return metric(worker, 'relay_deliveries_total{outcome="delivered"}') == 1

        eventually(delivered)
        # Its counters as this test alone moved them.
        worker = stack.worker_metrics()
        polled = 'relay_upstream_calls_total{endpoint="lipsync/requests/{id}",status="200"}'
        assert metric(worker, polled) >= 1
        assert metric(worker, "relay_delivery_latency_seconds_count") == 1
        assert metric(worker, 'relay_jobs_ended_total{caller="default",status="completed"}') == 1
        delivered_for = 'relay_caller_deliveries_total{caller="default",outcome="delivered"}'
        assert metric(worker, delivered_for) == 1
        assert httpx.get(stack.worker_urls[0] + "/healthz").json() == {"status": "ok"}
