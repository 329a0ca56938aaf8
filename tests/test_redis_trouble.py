"""A stalled Redis (SIGSTOP: a failover or an fsync stall) bounds every call instead of hanging it.

The API answers 503 while its Redis is stalled, and a worker whose Redis stalls in the middle of
a delivery retries the attempt once Redis is back rather than leaving the record pending.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from relay.api.app import create_app
from relay.settings import load_settings
from tests.helpers import submit, verified
from tests.servers import own_redis, serve
from tests.stack import (
    RELAY_KEY,
    SANDBOX_KEY,
    Callback,
    Receiver,
    eventually,
    job_field,
    relay_stack,
)

BODY = {
    "inputs": [
        {"type": "video", "url": "https://cdn.example.com/v.mp4"},
        {"type": "audio", "url": "https://cdn.example.com/a.wav"},
    ]
}


class StallingReceiver(Receiver):
    """Takes the first callback slowly, stalls Redis just before answering, resumes it later."""

    def __init__(self, redis_proc: subprocess.Popen[bytes], *, answer_after: float, stall: float):
        super().__init__()
        self.redis_proc = redis_proc
        self.answer_after = answer_after
        self.stall = stall
        self.resumed = threading.Event()

    def resume(self) -> None:
        os.kill(self.redis_proc.pid, signal.SIGCONT)
        self.resumed.set()

    def app(self) -> Starlette:
        async def hook(request: Request) -> Response:
            body = await request.body()
            with self.lock:
                first = not self.received
                self.received.append(Callback(dict(request.headers), body, time.monotonic()))
            if first:
                await asyncio.sleep(self.answer_after)
                os.kill(self.redis_proc.pid, signal.SIGSTOP)
                threading.Timer(self.stall, self.resume).start()
            return Response(status_code=200)

        return Starlette(routes=[Route("/hook", hook, methods=["POST"])])


@pytest.mark.long
def test_a_redis_stall_after_the_receiver_answers_does_not_strand_the_delivery() -> None:
    # Finding 1: the receiver answers just under RELAY_DELIVERY_TIMEOUT (2 s in the stack), then
    # Redis stalls past arq's job timeout. Unbounded, the attempt's write hangs until arq cancels
    # it and the record stays pending with nothing queued; bounded, the attempt runs again.
    with own_redis() as (redis_url, redis_proc):
        receiver = StallingReceiver(redis_proc, answer_after=1.7, stall=7.0)
        with relay_stack(redis_url, receiver=receiver, env={"RELAY_REDIS_TIMEOUT": "1"}) as stack:
            request_id = submit(stack)
            assert receiver.resumed.wait(timeout=60)
            eventually(
                lambda: job_field(redis_url, request_id, "delivery") == b"delivered", timeout=60
            )
            callbacks = list(stack.receiver.received)
            # At least once: the re-run attempt sends the same event under the same webhook-id.
            assert {c.headers["webhook-id"] for c in callbacks} == {
                callbacks[0].headers["webhook-id"]
            }
            assert all(verified(stack, c)["type"] == "lipsync.completed" for c in callbacks)

            # The worker came through the stall: a new job is polled and called back.
            second = submit(stack)
            eventually(lambda: job_field(redis_url, second, "delivery") == b"delivered", timeout=30)


def test_the_api_answers_503_while_redis_is_stalled() -> None:
    with own_redis() as (redis_url, redis_proc):
        settings = load_settings(
            CHAMELAION_BASE_URL="http://127.0.0.1:9/api",  # never reached: Redis is checked first
            CHAMELAION_API_KEY=SANDBOX_KEY,
            RELAY_REDIS_URL=redis_url,
            RELAY_API_KEYS=RELAY_KEY,
            RELAY_REDIS_TIMEOUT="0.5",
        )
        with serve(create_app(settings)) as api_url:
            headers = {"x-api-key": RELAY_KEY}
            eventually(lambda: httpx.get(api_url + "/readyz").status_code == 200)
            os.kill(redis_proc.pid, signal.SIGSTOP)
            try:
                # A hang would end in the client's own timeout (an exception), not an answer.
                submitted = httpx.post(
                    api_url + "/api/v1/lipsync/generate", json=BODY, headers=headers, timeout=20
                )
                assert submitted.status_code == 503
                assert "job store" in submitted.json()["error"]
                ready = httpx.get(api_url + "/readyz", timeout=20)
                assert ready.status_code == 503
            finally:
                os.kill(redis_proc.pid, signal.SIGCONT)
            eventually(lambda: httpx.get(api_url + "/readyz").status_code == 200)
