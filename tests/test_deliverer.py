"""Delivery attempts against awkward receivers and awkward timing, with the worker's real parts."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import orjson
import pytest
from arq import Retry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from relay.delivery.store import Delivery
from relay.redis import keys
from relay.worker.tasks import deliver
from tests.helpers import ended_job, worker_state
from tests.servers import raw_server, serve, too_many_headers
from tests.stack import Receiver


def answering(status: int, headers: dict[str, str]) -> Starlette:
    async def hook(request: Request) -> Response:
        return Response(status_code=status, headers=headers)

    return Starlette(routes=[Route("/hook", hook, methods=["POST"])])


async def test_an_attempt_waits_for_its_predecessor_to_record_its_outcome(redis_url: str) -> None:
    # Attempt 1 can be due before attempt 0 has recorded that it failed (a crash or a Redis
    # error between enqueueing 1 and recording): 1 must wait, not drop itself as stale.
    async with worker_state(redis_url) as state:
        await ended_job(state.store, "r1", "http://127.0.0.1:9/hook")
        # Through the arq job function too: the short retry passes through unchanged.
        with pytest.raises(Retry) as retry:
            await deliver({"relay": state}, "r1", 1)
        assert retry.value.defer_score == 5000
        assert await state.deliverer.attempt("r1", 3) == "stale"


async def test_retry_after_beyond_retention_keeps_the_job_for_the_next_attempt(
    redis_url: str,
) -> None:
    app = answering(503, {"retry-after": "500000"})
    with serve(app) as url:
        async with worker_state(redis_url) as state:
            await ended_job(state.store, "r2", url + "/hook")
            assert await state.deliverer.attempt("r2", 0) == "retry"
            # Retry-After is honoured up to a day; the job (retention 3600 s here) now
            # outlives that attempt by another day.
            queued = await state.redis.zrange(keys.ARQ_QUEUE, 0, -1, withscores=True)
            [(job_id, due_ms)] = queued
            assert job_id == b"deliver:r2:1"
            delay = due_ms / 1000 - time.time()
            assert 86400 - 5 <= delay <= 86400
            assert await state.redis.ttl(keys.job("r2")) >= delay + 86400 - 5


async def test_an_unexpected_error_ends_the_attempt_as_a_recorded_failure(redis_url: str) -> None:
    # Finding 5: a URL httpx cannot build (stored raw by an older relay) raised InvalidURL out
    # of the attempt, and arq re-ran it again and again. Now it is an outcome like any other.
    async with worker_state(redis_url, RELAY_DELIVERY_RETRY_SCHEDULE="0,0") as state:
        raw = "http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54:9/hook"
        await ended_job(state.store, "r3", raw)
        assert await state.deliverer.attempt("r3", 0) == "retry"
        assert await state.deliverer.attempt("r3", 1) == "failed"
        job = await state.store.get("r3")
        assert job is not None
        assert Delivery.of(job).state == "failed"
        assert Delivery.of(job).last_result == "unexpected error: InvalidURL"


@contextlib.contextmanager
def trickling_server() -> Iterator[str]:
    """Accepts, then sends a response one byte every 0.3 s: each read is quick, the whole slow."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve_one() -> None:
        listener.settimeout(5)
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                for byte in b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n":
                    if stop.wait(0.3):
                        return
                    conn.sendall(bytes([byte]))

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/hook"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


async def test_a_receiver_that_trickles_its_answer_times_out_as_a_retry(redis_url: str) -> None:
    with trickling_server() as url:
        async with worker_state(redis_url, RELAY_DELIVERY_TIMEOUT="1") as state:
            await ended_job(state.store, "r3", url)
            started = time.monotonic()
            assert await state.deliverer.attempt("r3", 0) == "retry"
            assert time.monotonic() - started < 3
            job = await state.store.get("r3")
            assert job is not None
            assert Delivery.of(job).attempt == 1 and Delivery.of(job).last_result == "timed out"


async def test_an_answer_that_is_not_http_is_recorded_as_such(redis_url: str) -> None:
    # A receiver whose answer broke HTTP (here 300 headers) connected fine: the attempt log
    # must say what went wrong, not that the relay "could not connect".
    async with raw_server(too_many_headers) as url, worker_state(redis_url) as state:
        await ended_job(state.store, "r4", url + "hook")
        assert await state.deliverer.attempt("r4", 0) == "retry"
        job = await state.store.get("r4")
        assert job is not None
        assert Delivery.of(job).last_result == "the answer was not well-formed HTTP"


async def test_an_end_seen_by_two_workers_at_once_is_delivered_by_one(redis_url: str) -> None:
    # A sweep in one worker and a per-id poll in another can see the same end at the same
    # moment, each with the job as it was before: only the one whose end counted hands the
    # delivery over, so the receiver is not sent the event twice.
    receiver = Receiver(delay=0.5)
    with serve(receiver.app()) as url:
        async with worker_state(redis_url) as first, worker_state(redis_url) as second:
            await first.store.create(
                "req-both", callback_url=url + "/hook", reference_id=None, first_poll_in=60
            )
            job = await first.store.get("req-both")
            assert job is not None
            seen = orjson.dumps({"id": "req-both", "status": "completed"})
            await asyncio.gather(
                first.sweeper.poller.observe(job, seen), second.sweeper.poller.observe(job, seen)
            )
            await asyncio.to_thread(receiver.wait_for, 1)
            await asyncio.sleep(1.0)  # a second send, had there been one, has arrived by now
            assert len(receiver.received) == 1
            attempts = [*first.first_attempts.in_flight.values()]
            await asyncio.gather(*attempts, *second.first_attempts.in_flight.values())
