"""A callback destination (scheme, host, port) shared by many callers: one caller's failing path
must not hold up the others (#24 finding 7).

A destination is backed off only for what says its host is unwell (no connection, a timeout, a
reset, 502/503/504), never for a path's own 500 or 4xx; its slots are shared fairly among the
owners of the attempts waiting for them; an attempt postponed for a backed-off destination is
written in its attempt log; once a back-off ends, one attempt at a time probes the destination.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from relay.delivery.deliverer import classify
from relay.delivery.destinations import DestinationBusy, Destinations
from relay.delivery.store import Breaker, DeliveryStore, Probe
from relay.redis import keys
from tests.helpers import B_KEY, attempts, submit, submit_as, submit_many, three_callers
from tests.servers import serve
from tests.stack import RELAY_KEY, Receiver, eventually, job_field, relay_stack


class Gateway:
    """One host:port in front of several services, as a Kubernetes gateway is: `/broken`
    answers 500 (one service's bug), `/healthy` answers 204."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.broken = 0
        self.healthy = 0

    def app(self) -> Starlette:
        async def broken(request: Request) -> Response:
            await request.body()
            with self.lock:
                self.broken += 1
            return Response(b"boom", status_code=500)

        async def healthy(request: Request) -> Response:
            await request.body()
            with self.lock:
                self.healthy += 1
            return Response(status_code=204)

        return Starlette(
            routes=[
                Route("/broken", broken, methods=["POST"]),
                Route("/healthy", healthy, methods=["POST"]),
            ]
        )


def test_one_paths_500s_do_not_hold_up_a_healthy_path_on_the_same_host(redis_url: str) -> None:
    gateway = Gateway()
    env = {
        "RELAY_DESTINATION_FAILURES": "3",
        # Were the 500s counted, 12 failures in a row would back the host off for this long.
        "RELAY_DESTINATION_MAX_BACKOFF": "120",
        "RELAY_DELIVERY_RETRY_SCHEDULE": "0,0.3,0.3,0.3,0.3,0.3",
    }
    with serve(gateway.app()) as gateway_url, relay_stack(redis_url, env=env) as stack:
        broken_ids = submit_many(stack, gateway_url + "/broken", 12)
        # Every broken job's first attempt has failed: 12 500s in a row from the host.
        eventually(lambda: gateway.broken >= 12, timeout=60)
        client = redis.Redis.from_url(redis_url)
        assert client.zcard(keys.BACKED_OFF) == 0, "a path's 500s backed the host off"
        stack.callback_url = gateway_url + "/healthy"
        healthy_id = submit(stack)
        eventually(lambda: job_field(redis_url, healthy_id, "delivery") == b"delivered", timeout=20)
        # (The outcome and its log entry are written in one round trip, not one step.)
        [entry] = eventually(lambda: attempts(stack, healthy_id))
        assert entry["attempt"] == 0 and entry["status"] == 204
        # The broken path's deliveries ran their whole schedule: none was postponed.
        eventually(
            lambda: all(job_field(redis_url, rid, "delivery") == b"failed" for rid in broken_ids),
            timeout=30,
        )
        assert all(job_field(redis_url, rid, "attempts_made") == b"6" for rid in broken_ids)
        assert client.zcard(keys.BACKED_OFF) == 0
        client.close()


def test_postponed_attempts_are_in_the_attempt_log(redis_url: str) -> None:
    receiver = Receiver(default=503)  # the host itself is unwell
    env = {
        "RELAY_DESTINATION_FAILURES": "2",
        "RELAY_DESTINATION_MAX_BACKOFF": "0.5",
        "RELAY_DELIVERY_RETRY_SCHEDULE": "0,0.2,0.2,0.2",
    }
    with relay_stack(redis_url, receiver=receiver, env=env) as stack:
        request_ids = submit_many(stack, stack.callback_url, 4)

        def postponed() -> list[dict[str, object]]:
            return [e for rid in request_ids for e in attempts(stack, rid) if e.get("postponed")]

        entries = eventually(postponed, timeout=30)
        entry = entries[0]
        assert entry["note"] == "postponed: the destination is backed off after failing"
        assert entry["next_at"] is not None
        assert entry["state"] in ("pending", "failing")
        # A postponement again of the same attempt updates its entry rather than adding one:
        # a long outage does not fill the log.
        eventually(lambda: any(int(str(e["postponed"])) >= 2 for e in postponed()), timeout=30)
        for rid in request_ids:
            logged = [e for e in attempts(stack, rid) if e.get("postponed")]
            per_attempt = [e["attempt"] for e in logged]
            assert len(per_attempt) == len(set(per_attempt))
        receiver.default = 204
        # Every delivery still ends (postponed attempts are not counted against the schedule).
        eventually(
            lambda: all(
                job_field(redis_url, rid, "delivery") in (b"delivered", b"failed")
                for rid in request_ids
            ),
            timeout=60,
        )


@pytest.mark.parametrize(
    ("status", "unwell"),
    [
        (200, False),
        (204, False),
        (400, False),
        (404, False),
        (410, False),
        (429, False),
        (500, False),
        (501, False),
        (502, True),
        (503, True),
        (504, True),
    ],
)
def test_only_gateway_statuses_say_the_host_is_unwell(status: int, unwell: bool) -> None:
    outcome = classify(httpx.Response(status))
    assert outcome.answered is not unwell


async def test_a_half_open_destination_lets_one_probe_through_at_a_time(redis_url: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    deliveries = DeliveryStore(client)
    destination = "http://receiver.example:80"
    breaker = Breaker(threshold=1, base=1, max_backoff=1)

    async def fails() -> float:
        update = await deliveries.record_outcome(
            "nobody", attempt=0, next_attempt=1, state="pending", result="HTTP 503",
            destination=destination, answered=False, breaker=breaker,
        )  # fmt: skip
        return update.backed_off_for

    async def back_off_ends() -> None:
        (seconds, _), *_ = [await client.time()]
        await client.zadd(keys.BACKED_OFF, {destination: seconds - 1})

    async def claim() -> Probe:
        return await deliveries.claim_probe(destination, hold=20, wait=1)

    try:
        assert await claim() == Probe(go=True, wait=0), "closed: every attempt goes"
        assert await fails() == 1
        backed_off = await claim()
        assert not backed_off.go and 0 < backed_off.wait <= 1
        await back_off_ends()
        assert await claim() == Probe(go=True, wait=1), "half-open: the first is the probe"
        for _ in range(3):
            waiting = await claim()
            assert not waiting.go and 0 < waiting.wait <= 1, "the others wait for its outcome"
        assert await fails() == 1, "the probe failed: backed off again"
        assert not (await claim()).go
        await back_off_ends()
        assert (await claim()).go
        await deliveries.record_outcome(
            "nobody", attempt=0, next_attempt=1, state="delivered", result="HTTP 204",
            destination=destination, answered=True, breaker=breaker,
        )  # fmt: skip
        assert await claim() == Probe(go=True, wait=0), "the probe was answered: closed"
        assert await client.zcard(keys.BACKED_OFF) == 0
    finally:
        await client.aclose()


def test_a_worker_asks_redis_only_once_a_back_off_it_saw_has_ended() -> None:
    destinations = Destinations(per_destination=1, total=1)
    destination = "http://receiver.example:80"
    assert not destinations.half_open(destination), "never backed off: no round trip"
    # A second's back-off: the two checks inside it hold on a machine that stalls this thread.
    destinations.record(destination, 1.0)
    assert destinations.backed_off_for(destination) > 0
    assert not destinations.half_open(destination), "backed off: postponed without asking"
    time.sleep(1.05)
    assert destinations.backed_off_for(destination) == 0
    assert destinations.half_open(destination), "ended, idle: kept until Redis says closed"
    destinations.record(destination, 0)
    assert not destinations.half_open(destination)


async def test_one_owner_does_not_take_every_slot_of_a_destination() -> None:
    destinations = Destinations(per_destination=2, total=100)
    host = "http://gateway:80"
    release = asyncio.Event()
    order: list[str] = []

    async def send(owner: str, name: str) -> None:
        async with destinations.slot(host, owner=owner, wait=None):
            order.append(name)
            await release.wait()

    # Owner A fills the destination's two slots and queues four more attempts behind them.
    tasks = [asyncio.create_task(send("a", f"a{i}")) for i in range(6)]
    while len(order) < 2:
        assert not any(task.done() for task in tasks), [t.exception() for t in tasks if t.done()]
        await asyncio.sleep(0)
    # Then B's one attempt arrives: it goes ahead of A's queue, not behind it.
    tasks.append(asyncio.create_task(send("b", "b0")))
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(*tasks)
    assert order.index("b0") == 2, order


async def test_a_waiter_that_gives_up_leaves_the_slot_to_the_next() -> None:
    destinations = Destinations(per_destination=1, total=100)
    host = "http://gateway:80"
    release = asyncio.Event()
    got: list[str] = []

    async def send(owner: str, wait: float | None) -> None:
        async with destinations.slot(host, owner=owner, wait=wait):
            got.append(owner)
            await release.wait()

    holder = asyncio.create_task(send("a", None))
    while not got:
        assert not holder.done(), holder.exception()
        await asyncio.sleep(0)
    with pytest.raises(DestinationBusy):
        await send("b", 0.01)
    later = asyncio.create_task(send("c", None))
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(holder, later)
    assert got == ["a", "c"]
    assert destinations.in_flight == 0 and destinations.waiting == 0


class SharedHost:
    """One host:port for two teams: team-a's path answers after `hang` seconds, team-b's at
    once; it notes how many slow answers had gone out when each fast callback arrived."""

    def __init__(self, hang: float) -> None:
        self.hang = hang
        self.lock = threading.Lock()
        self.slow_in_flight = 0
        self.slow_answered = 0
        self.fast_arrivals: list[int] = []

    def app(self) -> Starlette:
        async def slow(request: Request) -> Response:
            await request.body()
            with self.lock:
                self.slow_in_flight += 1
            await asyncio.sleep(self.hang)
            with self.lock:
                self.slow_in_flight -= 1
                self.slow_answered += 1
            return Response(status_code=204)

        async def fast(request: Request) -> Response:
            await request.body()
            with self.lock:
                self.fast_arrivals.append(self.slow_answered)
            return Response(status_code=204)

        return Starlette(
            routes=[Route("/slow", slow, methods=["POST"]), Route("/fast", fast, methods=["POST"])]
        )


@pytest.mark.long
def test_one_callers_slow_callbacks_do_not_queue_another_callers_behind_them(
    redis_url: str, tmp_path: Path
) -> None:
    host = SharedHost(hang=3.0)
    env = {
        **three_callers(tmp_path / "callers.json"),
        "RELAY_DESTINATION_CONCURRENCY": "2",
        "RELAY_DELIVERY_TIMEOUT": "10",
    }
    with serve(host.app()) as host_url, relay_stack(redis_url, env=env) as stack:
        # team-a's six callbacks take the host's two slots and queue four more behind them.
        stack.callback_url = host_url + "/slow"
        for n in range(6):
            submit_as(stack, RELAY_KEY, f"a-{n}")
        eventually(lambda: host.slow_in_flight == 2, timeout=30)
        eventually(lambda: waiting(stack.worker_metrics()) >= 4, timeout=30)
        # team-b's one callback to the same host takes the next free slot, not the fifth.
        stack.callback_url = host_url + "/fast"
        submit_as(stack, B_KEY, "b-0")
        eventually(lambda: host.fast_arrivals, timeout=60)
        [slow_answered_before] = host.fast_arrivals
        assert slow_answered_before <= 3, f"team-b waited for {slow_answered_before} of team-a's"
        eventually(lambda: host.slow_answered == 6, timeout=60)


def waiting(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("relay_deliveries_waiting "):
            return float(line.split()[1])
    raise AssertionError("relay_deliveries_waiting is not reported")
