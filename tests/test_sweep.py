"""Sweeps: statuses learned from the list of requests, in either order, through faults and crashes.

Per-id polls are made rare here (RELAY_POLL_MIN_INTERVAL 10 s) so that a callback arriving
quickly shows a sweep found the job; the sandbox holds history rows the relay must not track.
"""

from __future__ import annotations

import functools
import itertools
import re
import signal
import threading
import time
from typing import Any, cast

import httpx
import orjson
import pytest
import redis
from standardwebhooks import Webhook

from relay.jobs.sweep import created_time, direction
from relay.redis import keys
from relay.sandbox import SandboxConfig
from tests.helpers import LIST_ROUTE, POLL_ROUTE, pin, read_times, relay_view, submit
from tests.stack import SANDBOX_KEY, Stack, eventually, is_up, job_field, relay_stack

ORDERS = ["newest_first", "oldest_first"]
SWEEPS_ONLY = {
    "RELAY_POLL_MIN_INTERVAL": "10",
    "RELAY_POLL_MAX_INTERVAL": "10",
    "RELAY_SWEEP_INTERVAL": "0.3",
}


def sandbox(order: str = "newest_first", **knobs: object) -> SandboxConfig:
    settings: dict[str, object] = {
        "api_keys": (SANDBOX_KEY,),
        "queued_seconds": 0.3,
        "processing_seconds": 0.5,
        "list_order": order,
        "list_max_limit": 20,
        "history": 3000,
        **knobs,
    }
    return SandboxConfig(**settings)  # type: ignore[arg-type]


def calls(stack: Stack, route: str) -> int:
    count: int = stack.upstream("GET", "/_sandbox/stats").json()["calls"].get(route, 0)
    return count


def metric(stack: Stack, worker: int, name: str, **labels: str) -> float:
    """One sample from a worker's /metrics (0 when absent)."""
    text = httpx.get(stack.worker_urls[worker] + "/metrics").text
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if wanted else "") + r" (\S+)$"
    match = re.search("^" + pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def ready(stack: Stack) -> Stack:
    """Wait until every worker is up: jobs submitted earlier would fall due for per-id polls."""
    for url in stack.worker_urls:
        eventually(functools.partial(is_up, url), timeout=60)
    return stack


def fault(stack: Stack, **body: object) -> None:
    response = stack.upstream("POST", "/_sandbox/faults", json={"paths": LIST_ROUTE, **body})
    assert response.status_code == 200, response.text


def verified_callbacks(
    stack: Stack, count: int, timeout: float = 30.0
) -> dict[str, dict[str, Any]]:
    """Wait for `count` callbacks; verify each; return payloads by request id (no duplicates)."""
    received = stack.receiver.wait_for(count, timeout=timeout)
    hook = Webhook(stack.webhook_secrets[0])
    payloads: dict[str, dict[str, Any]] = {}
    for callback in received:
        payload = hook.verify(callback.body, callback.headers)
        assert payload["data"]["id"] not in payloads, "a job ended twice"
        payloads[payload["data"]["id"]] = payload
    return payloads


def lease_holder(redis_url: str) -> int | None:
    """The pid of the worker holding the sweep lease (its token starts with it)."""
    client = redis.Redis.from_url(redis_url)
    try:
        token = cast(bytes | None, client.get(keys.SWEEP_LEASE))
    finally:
        client.close()
    return int(token.split(b":")[0]) if token else None


def tracked_jobs(redis_url: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return sum(1 for _ in client.scan_iter(keys.job("*")))
    finally:
        client.close()


@pytest.mark.parametrize("order", ORDERS)
def test_sweeps_call_back_from_list_pages_in_either_order(redis_url: str, order: str) -> None:
    with relay_stack(redis_url, sandbox=sandbox(order), env=SWEEPS_ONLY) as stack:
        ready(stack)
        ids = [submit(stack) for _ in range(30)]
        payloads = verified_callbacks(stack, 30)
        assert set(payloads) == set(ids)
        for request_id in ids[:3]:
            final = stack.upstream("GET", f"/api/v1/lipsync/requests/{request_id}").json()
            assert payloads[request_id]["type"] == "lipsync.completed"
            assert payloads[request_id]["data"] == final  # the row as Chamelaion returned it
        assert calls(stack, POLL_ROUTE) < 30, "sweeps, not per-id polls, found the jobs"
        # 3,000 history rows are 150 pages: the sweeps read only the window of the list.
        pages = metric(stack, 0, "relay_sweep_pages_total")
        sweeps = metric(stack, 0, "relay_sweeps_total", outcome="complete")
        assert 0 < pages / sweeps < 10
        assert tracked_jobs(redis_url) == 30, "rows the relay does not track are never stored"
        assert metric(stack, 0, "relay_sweep_order_total", order=order) >= 1


def test_an_oldest_first_sweep_resumes_where_the_window_starts(redis_url: str) -> None:
    # 3,000 history rows are 150 pages; the outstanding jobs fit in the last one. Found once,
    # the window's start is remembered: later sweeps read a page or two, not a new bisection.
    config = sandbox("oldest_first", queued_seconds=600, processing_seconds=600)
    with relay_stack(redis_url, sandbox=config, env=SWEEPS_ONLY) as stack:
        ready(stack)
        for _ in range(5):
            submit(stack)
        sweeps = functools.partial(metric, stack, 0, "relay_sweeps_total", outcome="complete")
        eventually(lambda: sweeps() >= 2, timeout=30)
        pages, done = metric(stack, 0, "relay_sweep_pages_total"), sweeps()
        eventually(lambda: sweeps() >= done + 5, timeout=30)
        per_sweep = (metric(stack, 0, "relay_sweep_pages_total") - pages) / (sweeps() - done)
        assert per_sweep <= 2.5, f"{per_sweep:.1f} pages a sweep: the window is searched anew"


def test_status_changes_below_terminal_are_recorded_from_pages(redis_url: str) -> None:
    config = sandbox(queued_seconds=60, processing_seconds=60)
    with relay_stack(redis_url, sandbox=config, env=SWEEPS_ONLY) as stack:
        ready(stack)
        request_id = submit(stack)
        eventually(lambda: job_field(redis_url, request_id, "status") == b"queued", timeout=60)
        pin(stack, request_id, status="processing")
        eventually(lambda: job_field(redis_url, request_id, "status") == b"processing")
        assert relay_view(stack, request_id)["status"] == "processing"
        assert metric(stack, 0, "relay_polls_total", result="answered") == 0, "no per-id poll"
        assert metric(stack, 0, "relay_sweep_rows_matched_total") >= 2
        assert stack.receiver.received == []


@pytest.mark.parametrize("order", ORDERS)
def test_jobs_arriving_during_sweeps_are_all_caught_once(redis_url: str, order: str) -> None:
    config = sandbox(order, list_max_limit=5, history=500)
    with relay_stack(redis_url, sandbox=config, env=SWEEPS_ONLY) as stack:
        ready(stack)
        # Every page is slow, so sweeps are always mid-way while new jobs shift the offsets.
        fault(stack, delay=0.1, count=1000)
        ids: list[str] = []

        def keep_submitting() -> None:
            for _ in range(20):
                ids.append(submit(stack))
                time.sleep(0.1)

        submitter = threading.Thread(target=keep_submitting)
        submitter.start()
        submitter.join()
        payloads = verified_callbacks(stack, 20, timeout=60)
        assert set(payloads) == set(ids)
        time.sleep(1.0)  # no second callback for any job
        assert len(stack.receiver.received) == 20


def test_a_failing_list_leaves_every_job_to_per_id_polls(redis_url: str) -> None:
    with relay_stack(redis_url, sandbox=sandbox()) as stack:
        ready(stack)
        fault(stack, status=500, count=100_000)
        ids = [submit(stack) for _ in range(5)]
        payloads = verified_callbacks(stack, 5)
        assert set(payloads) == set(ids)
        assert calls(stack, POLL_ROUTE) >= 5
        assert metric(stack, 0, "relay_sweeps_total", outcome="error") >= 1


def test_a_429_on_a_list_page_pauses_every_upstream_call(redis_url: str) -> None:
    config = sandbox(list_max_limit=3, history=100, queued_seconds=60, processing_seconds=60)
    env = {**SWEEPS_ONLY, "RELAY_POLL_MIN_INTERVAL": "0.2", "RELAY_POLL_MAX_INTERVAL": "0.5"}
    with relay_stack(redis_url, sandbox=config, env=env) as stack:
        ready(stack)
        ids = [submit(stack) for _ in range(12)]  # four pages a sweep
        eventually(lambda: calls(stack, LIST_ROUTE) >= 2, timeout=60)
        fault(stack, status=429, retry_after=2)
        eventually(lambda: metric(stack, 0, "relay_sweeps_total", outcome="rate_limited") >= 1)
        time.sleep(2.5)
        gaps = [later - earlier for earlier, later in itertools.pairwise(read_times(stack))]
        assert max(gaps) >= 1.9, "after a 429 with Retry-After: 2 nobody calls for 2 s"
        for request_id in ids:
            pin(stack, request_id, status="completed")
        assert set(verified_callbacks(stack, 12)) == set(ids)


def test_a_list_in_no_usable_order_falls_back_with_a_log_and_a_metric(redis_url: str) -> None:
    config = sandbox("shuffled", list_max_limit=50, history=500)
    env = {"RELAY_SWEEP_INTERVAL": "0.3"}
    with relay_stack(redis_url, sandbox=config, env=env) as stack:
        ready(stack)
        ids = [submit(stack) for _ in range(5)]
        assert set(verified_callbacks(stack, 5)) == set(ids)
        assert metric(stack, 0, "relay_sweeps_total", outcome="unusable_order") >= 1
        assert metric(stack, 0, "relay_sweep_order_total", order="unusable") >= 1
        assert calls(stack, POLL_ROUTE) >= 5
        assert "neither newest nor oldest first" in stack.worker_logs[0].read_text()


def test_a_worker_killed_mid_sweep_hands_the_sweep_over(redis_url: str) -> None:
    env = {**SWEEPS_ONLY, "RELAY_POLL_LEASE": "4"}
    with relay_stack(redis_url, sandbox=sandbox(), env=env, workers=2) as stack:
        ready(stack)
        submit(stack)
        stack.receiver.wait_for(1, timeout=30)
        fault(stack, delay=1.0, count=1000)  # every page is slow: sweepers are caught mid-sweep
        request_id = submit(stack)
        eventually(
            lambda: stack.upstream("GET", "/_sandbox/stats").json()["in_flight"].get(LIST_ROUTE)
        )
        pids = [proc.pid for proc in stack.workers]
        victim = pids.index(eventually(lambda: lease_holder(redis_url)))
        stack.stop_worker(stack.workers[victim], signal.SIGKILL)
        survivor = pids[1 - victim]
        eventually(lambda: lease_holder(redis_url) == survivor, timeout=30)
        payloads = verified_callbacks(stack, 2, timeout=30)
        assert request_id in payloads


def test_two_workers_share_the_sweep_one_page_at_a_time(redis_url: str) -> None:
    # Jobs stay queued until pinned: several sweeps run over them, however loaded the machine.
    config = sandbox(list_max_limit=4, queued_seconds=600, processing_seconds=600)
    with relay_stack(redis_url, sandbox=config, env=SWEEPS_ONLY, workers=2) as stack:
        ready(stack)
        fault(stack, delay=0.1, count=1000)
        ids = [submit(stack) for _ in range(12)]

        def sweeps() -> float:
            return sum(metric(stack, i, "relay_sweeps_total", outcome="complete") for i in (0, 1))

        eventually(lambda: sweeps() >= 3, timeout=60)
        for request_id in ids:
            pin(stack, request_id, status="completed")
        assert set(verified_callbacks(stack, 12, timeout=60)) == set(ids)
        peak = stack.upstream("GET", "/_sandbox/stats").json()["peak_in_flight"][LIST_ROUTE]
        assert peak == 1, "two sweeps overlapped"


def test_a_job_too_old_for_the_window_is_polled_by_id(redis_url: str) -> None:
    env = {
        "RELAY_POLL_MIN_INTERVAL": "1",
        "RELAY_POLL_MAX_INTERVAL": "1",
        "RELAY_SWEEP_INTERVAL": "0.3",
        "RELAY_SWEEP_WINDOW": "4",
    }
    config = sandbox(queued_seconds=600, processing_seconds=600)
    with relay_stack(redis_url, sandbox=config, env=env) as stack:
        ready(stack)
        request_id = submit(stack)
        eventually(lambda: calls(stack, LIST_ROUTE) >= 1)
        time.sleep(5)  # the job is now older than the window: sweeps leave it alone
        per_id = calls(stack, POLL_ROUTE)
        listed = calls(stack, LIST_ROUTE)
        eventually(lambda: calls(stack, POLL_ROUTE) >= per_id + 2, timeout=30)
        assert calls(stack, LIST_ROUTE) == listed, "no list page is read for it"
        pin(stack, request_id, status="completed")
        payload = verified_callbacks(stack, 1)[request_id]
        assert orjson.loads(orjson.dumps(payload))["type"] == "lipsync.completed"


def test_the_list_order_is_read_from_created_at() -> None:
    times = [created_time(f"2026-04-07T10:00:0{s}Z") for s in (1, 2, 2, 5)]
    assert direction(times) == "oldest_first"
    assert direction(times[::-1]) == "newest_first"
    assert direction([times[0], None, times[0]]) is None, "one second says nothing of order"
    assert direction([times[1], times[0], times[3]]) == "unusable"
    assert created_time("yesterday-ish") is None and created_time(None) is None
    assert created_time("2026-04-07T10:00:00") is None, "a time without a zone is no time"
