"""What /metrics says: the shared gauges read from Redis, workers alive, the API's responses.

Shared gauges are read from a real Redis after the relay's own parts put it in the state to
report; the rest from a running stack (the API in this process, whose counters earlier tests
have moved: deltas), or for the API's unexpected errors, the counting layer around an app
that raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from urllib.parse import urlsplit

import httpx
import pytest
from arq.connections import ArqRedis
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from relay.api.response_counts import ResponseCounter
from relay.delivery.queue import DeliveryQueue
from relay.jobs.schedule import PollSchedule
from relay.jobs.store import JobStore
from relay.redis import keys
from relay.redis.shared_state import read_shared_state
from relay.worker.heartbeat import Heartbeat
from tests.helpers import end_job
from tests.stack import RELAY_KEY, Stack, eventually, relay_stack

HOOK = "https://receiver.example/hook"
WAIT = 0.3  # long enough for a lag or an age to be told from none


def sample(text: str, name: str) -> float:
    """A sample's value; 0 when not exposed yet (labelled counters appear on first use)."""
    for line in text.splitlines():
        found, _, value = line.partition(" ")
        if found == name:
            return float(value)
    return 0.0


def responses(stack: Stack, status_class: str) -> float:
    text = httpx.get(stack.api_url + "/metrics").text
    return sample(text, f'relay_http_responses_total{{status_class="{status_class}"}}')


# --- Shared gauges ----------------------------------------------------------------------------


async def test_an_empty_relay_reports_nothing_late_and_no_worker(redis: Redis) -> None:
    shared = await read_shared_state(redis)
    assert (shared.delivery_lag, shared.pending_age, shared.paused_for) == (0, 0, 0)
    assert shared.workers == 0


async def test_delivery_lag_is_how_overdue_the_most_overdue_queued_attempt_is(
    redis: Redis,
) -> None:
    queue = DeliveryQueue(ArqRedis(redis.connection_pool), (0.0,), clock=None)
    # An attempt deferred (a retry on its schedule, a postponement) is not late.
    await queue.enqueue_attempt("later", 1, 3600.0, None)
    await asyncio.sleep(WAIT)
    assert (await read_shared_state(redis)).delivery_lag == 0
    # One due now that no worker makes is late, more so as time goes by.
    await queue.enqueue_attempt("due", 1, 0.0, None)
    await asyncio.sleep(WAIT)
    first = (await read_shared_state(redis)).delivery_lag
    await asyncio.sleep(WAIT)
    second = (await read_shared_state(redis)).delivery_lag
    assert WAIT <= first < second


async def test_pending_delivery_age_counts_from_the_end_of_the_oldest_unattempted_job(
    redis: Redis,
) -> None:
    store = JobStore(redis)
    for request_id in ("older", "newer"):
        assert await store.create(request_id, callback_url=HOOK, reference_id=None, first_poll_in=0)
    assert (await read_shared_state(redis)).pending_age == 0  # running jobs owe no callback
    await end_job(store, "older")
    await asyncio.sleep(WAIT)
    await end_job(store, "newer")
    assert (await read_shared_state(redis)).pending_age >= WAIT  # the older one's


async def test_an_upstream_pause_reports_the_seconds_left(redis: Redis) -> None:
    schedule = PollSchedule(redis, rate=10, lease=30)
    await schedule.pause_upstream(30)
    paused_for = (await read_shared_state(redis)).paused_for
    assert 25 < paused_for <= 30


async def test_workers_alive_counts_current_heartbeats_of_healthy_workers(redis: Redis) -> None:
    healthy = True
    one = Heartbeat(redis, lambda: healthy)
    other = Heartbeat(redis, lambda: healthy)
    other.member = "other-pod:1"
    await one.beat()
    await other.beat()
    assert (await read_shared_state(redis)).workers == 2
    await one.leave()
    assert (await read_shared_state(redis)).workers == 1
    # A stuck worker stops stamping; a dead one's stamp runs out (here: ran out a second ago).
    healthy = False
    await one.beat()
    now, _ = await redis.time()
    await redis.zadd(keys.WORKERS, {other.member: now - 1})
    assert (await read_shared_state(redis)).workers == 0
    healthy = True
    await one.beat()  # and drops the stamp that ran out
    assert await redis.zrange(keys.WORKERS, 0, -1) == [one.member.encode()]


def test_a_running_worker_is_counted_alive_until_it_stops(redis_url: str) -> None:
    with relay_stack(redis_url) as stack:
        # The API reports it: the count does not depend on scraping a worker.
        text = eventually(lambda: httpx.get(stack.api_url + "/metrics").text)
        assert sample(text, "relay_upstream_rate_limit") == 100
        eventually(
            lambda: sample(httpx.get(stack.api_url + "/metrics").text, "relay_workers_alive") == 1
        )
        assert stack.stop_worker(stack.workers[0], signal.SIGTERM) == 0
        # Counted out when it stopped, not when its stamp would have run out.
        assert sample(httpx.get(stack.api_url + "/metrics").text, "relay_workers_alive") == 0


# --- The API's responses ----------------------------------------------------------------------


def test_api_responses_are_counted_by_status_class_without_probes(redis_url: str) -> None:
    headers = {"x-api-key": RELAY_KEY}
    with relay_stack(redis_url, workers=0) as stack:
        before = {c: responses(stack, c) for c in ("2xx", "4xx", "5xx")}
        for path in ("/healthz", "/readyz", "/metrics"):
            assert httpx.get(stack.api_url + path).status_code == 200
        tracked = httpx.get(stack.api_url + "/api/v1/lipsync/requests", headers=headers)
        assert tracked.status_code == 200
        refused = httpx.get(stack.api_url + "/api/v1/lipsync/requests/x")
        assert refused.status_code == 401
        stack.upstream(
            "POST", "/_sandbox/faults", json={"status": 500, "count": 1, "paths": "generate"}
        )
        failed = httpx.post(
            stack.api_url + "/api/v1/lipsync/generate",
            headers=headers,
            json={
                "inputs": [
                    {"type": "video", "url": "https://cdn.example.com/v.mp4"},
                    {"type": "audio", "url": "https://cdn.example.com/a.wav"},
                ]
            },
        )
        assert failed.status_code == 502
        after = {c: responses(stack, c) for c in ("2xx", "4xx", "5xx")}
        assert {c: after[c] - before[c] for c in after} == {"2xx": 1, "4xx": 1, "5xx": 1}


@pytest.mark.long
def test_the_503s_past_the_concurrency_limit_are_counted(redis_url: str) -> None:
    env = {"RELAY_HTTP_MAX_CONCURRENCY": "4", "RELAY_HTTP_BODY_TIMEOUT": "10"}
    with relay_stack(redis_url, workers=0, env=env) as stack:
        url = urlsplit(stack.api_url)
        assert url.hostname is not None and url.port is not None
        before = responses(stack, "5xx")
        refused = 0
        with contextlib.ExitStack() as held:
            stalled = []
            for _ in range(4):  # requests in flight: bodies never sent
                sock = held.enter_context(socket.create_connection((url.hostname, url.port)))
                sock.sendall(
                    b"POST /api/v1/lipsync/generate HTTP/1.1\r\nHost: relay\r\n"
                    + f"x-api-key: {RELAY_KEY}\r\ncontent-length: 100\r\n\r\n".encode()
                )
                stalled.append(sock)

            def turned_away() -> bool:
                nonlocal refused
                status = httpx.get(stack.api_url + "/api/v1/lipsync/requests/x").status_code
                refused += status == 503
                return status == 503

            eventually(turned_away)
            # Probes turned away the same way are not counted.
            assert httpx.get(stack.api_url + "/healthz").status_code == 503
            for sock in stalled:  # each ends as the 408 its body timeout brings (a 4xx)
                sock.settimeout(30)
                assert sock.recv(65536).startswith(b"HTTP/1.1 408 ")
        eventually(lambda: httpx.get(stack.api_url + "/healthz").status_code == 200)
        assert responses(stack, "5xx") - before == refused >= 1


async def test_an_unexpected_error_is_counted_as_the_500_it_becomes() -> None:
    async def broken(request: Request) -> Response:
        raise RuntimeError("a bug")

    async def fine(request: Request) -> Response:
        return Response(status_code=204)

    app = Starlette(
        routes=[Route("/broken", broken), Route("/fine", fine)],
        middleware=[Middleware(ResponseCounter)],
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://relay") as client:
        before = {c: counted_now(c) for c in ("2xx", "5xx")}
        assert (await client.get("/broken")).status_code == 500
        assert (await client.get("/fine")).status_code == 204
    assert {c: counted_now(c) - before[c] for c in before} == {"2xx": 1, "5xx": 1}


def counted_now(status_class: str) -> float:
    value = REGISTRY.get_sample_value("relay_http_responses_total", {"status_class": status_class})
    return value or 0.0


def test_a_caller_hanging_up_mid_body_is_its_4xx_not_a_relay_5xx(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        url = urlsplit(stack.api_url)
        assert url.hostname is not None and url.port is not None
        before = {c: responses(stack, c) for c in ("4xx", "5xx")}
        with socket.create_connection((url.hostname, url.port)) as sock:
            sock.sendall(
                b"POST /api/v1/lipsync/generate HTTP/1.1\r\nHost: relay\r\n"
                + f"x-api-key: {RELAY_KEY}\r\ncontent-length: 100\r\n\r\n".encode()
                + b'{"inputs": ['
            )
        # The hang-up is the caller's: counted as the 400 the relay gives it, never as a 500.
        eventually(lambda: responses(stack, "4xx") - before["4xx"] == 1)
        assert responses(stack, "5xx") == before["5xx"]
