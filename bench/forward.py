"""Throughput of the relay API: submissions forwarded to the upstream, and tracked-status reads.

Run: uv run python bench/forward.py [--seconds 5]

Starts a real redis-server, the sandbox upstream (`relay sandbox`) and the API (`relay api`) as
separate processes, then drives the API from this process at 4 and 32 concurrent requests. On a
2-core machine the load generator, the API and the sandbox share the cores, so the figures are
a floor, not a ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
from httpx_aiohttp import AiohttpTransport

from relay.devtools.embedded_redis import embedded_redis, free_port

BODY = {
    "inputs": [
        {"type": "video", "url": "https://cdn.example.com/v.mp4"},
        {"type": "audio", "url": "https://cdn.example.com/a.wav"},
    ],
    "callback_url": "http://10.0.0.1/hook",
}


def start(args: list[str], env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(
                f"http://127.0.0.1:{port}/healthz"
                if args[0] == "api"
                else f"http://127.0.0.1:{port}/api/health",
                timeout=0.5,
            )
            return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"relay {args[0]} did not start")


async def drive(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    concurrency: int,
    seconds: float,
    body: object = None,
) -> tuple[float, int]:
    done = errors = 0
    deadline = time.monotonic() + seconds

    async def one() -> None:
        nonlocal done, errors
        while time.monotonic() < deadline:
            response = await client.request(method, url, json=body)
            if response.status_code == 200:
                done += 1
            else:
                errors += 1

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    return done / (time.monotonic() - started), errors


async def bench(api: str, seconds: float) -> None:
    headers = {"x-api-key": "bench-key-0123456789"}
    async with httpx.AsyncClient(
        transport=AiohttpTransport(), headers=headers, timeout=30
    ) as client:
        first = await client.post(api + "/api/v1/lipsync/generate", json=BODY)
        request_id = first.json()["request_id"]
        await asyncio.sleep(0.1)
        for concurrency in (4, 32):
            rate, errors = await drive(
                client, "POST", api + "/api/v1/lipsync/generate", concurrency, seconds, BODY
            )
            print(
                f"POST generate (forward + track) at {concurrency:>2} concurrent: "
                f"{rate:,.0f} req/s, {errors} errors"
            )
            rate, errors = await drive(
                client, "GET", f"{api}/api/v1/lipsync/requests/{request_id}", concurrency, seconds
            )
            print(
                f"GET tracked status              at {concurrency:>2} concurrent: "
                f"{rate:,.0f} req/s, {errors} errors"
            )


def main(seconds: float) -> None:
    sandbox_port, api_port = free_port(), free_port()
    with embedded_redis(avoid=(sandbox_port, api_port)) as redis_url:
        env = {
            **os.environ,
            "CHAMELAION_BASE_URL": f"http://127.0.0.1:{sandbox_port}/api",
            "CHAMELAION_API_KEY": "sandbox-key",
            "RELAY_REDIS_URL": redis_url,
            "RELAY_API_KEYS": "bench-key-0123456789",
            "RELAY_LOG_FORMAT": "json",
        }
        procs = [start(["sandbox", "--port", str(sandbox_port)], env, sandbox_port)]
        procs.append(start(["api", "--port", str(api_port)], env, api_port))
        try:
            asyncio.run(bench(f"http://127.0.0.1:{api_port}", seconds))
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    main(parser.parse_args().seconds)
