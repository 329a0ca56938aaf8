"""SIGTERM under load: the API finishes in-flight requests; a worker hands back the rest."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import orjson

from relay.devtools.ports import free_port
from tests.helpers import submit
from tests.stack import RELAY_KEY, Receiver, eventually, job_field, relay_stack, serving

BODY = {
    "inputs": [
        {"type": "video", "url": "https://cdn.example.com/v.mp4"},
        {"type": "audio", "url": "https://cdn.example.com/a.wav"},
    ]
}


def test_api_sigterm_finishes_in_flight_requests_and_exits_0(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        port = free_port()
        api = subprocess.Popen(
            [sys.executable, "-m", "relay.cli", "api", "--port", str(port)], env=stack.env
        )
        url = f"http://127.0.0.1:{port}"
        serving(api, url)
        # Every submission now takes 3 s upstream, so all of them are in flight at SIGTERM.
        stack.upstream(
            "POST",
            "/_sandbox/faults",
            json={"status": None, "delay": 3.0, "count": 8, "paths": "generate"},
        )

        def upstream_in_flight() -> int:
            stats = stack.upstream("GET", "/_sandbox/stats").json()
            count: int = stats["in_flight"].get("POST /v1/lipsync/generate", 0)
            return count

        def post(_: int) -> httpx.Response:
            return httpx.post(
                url + "/api/v1/lipsync/generate",
                json=BODY,
                headers={"x-api-key": RELAY_KEY},
                timeout=10,
            )

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(post, n) for n in range(8)]
            # Every submission has reached Chamelaion (the API holds all 8) before the signal.
            eventually(lambda: upstream_in_flight() == 8, timeout=10)
            api.send_signal(signal.SIGTERM)
            responses = [future.result() for future in futures]
        assert api.wait(timeout=20) == 0
        assert [response.status_code for response in responses] == [200] * 8
        for response in responses:
            request_id = response.json()["request_id"]
            assert job_field(redis_url, request_id, "created") is not None, "accepted means tracked"


def test_worker_sigterm_loses_and_duplicates_nothing(redis_url: str) -> None:
    receiver = Receiver(delay=1.0)  # deliveries are in flight when the signal comes
    # A generous delivery timeout: a slow answer must not look like a failure under CI load.
    env = {"RELAY_SHUTDOWN_TIMEOUT": "8", "RELAY_DELIVERY_TIMEOUT": "10"}
    with relay_stack(redis_url, receiver=receiver, env=env, processes=True) as stack:
        request_ids = [submit(stack) for _ in range(6)]
        receiver.wait_for(1)
        first = stack.workers[0]
        assert stack.stop_worker(first, signal.SIGTERM) == 0
        stack.start_worker()

        def all_delivered() -> bool:
            return all(job_field(redis_url, rid, "delivery") == b"delivered" for rid in request_ids)

        eventually(all_delivered, timeout=30)
        time.sleep(1.5)
        delivered = [orjson.loads(callback.body)["data"]["id"] for callback in receiver.received]
        assert sorted(delivered) == sorted(request_ids), "each job called back exactly once"
