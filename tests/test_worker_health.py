"""The worker's liveness check fails when the worker is stuck, and recovers when it is not."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import httpx
import pytest

from relay.devtools.ports import free_port
from relay.settings import load_settings
from relay.worker import dispatcher, process
from tests.servers import own_redis
from tests.stack import SANDBOX_KEY, new_secret


async def status(url: str) -> int:
    async with httpx.AsyncClient() as client:
        return (await client.get(url, timeout=2)).status_code


async def test_liveness_fails_while_redis_hangs_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatcher, "STALE_AFTER", 1.0)
    port = free_port()
    with own_redis() as (redis_url, redis_proc):
        await asyncio.sleep(0.3)
        settings = load_settings(
            CHAMELAION_API_KEY=SANDBOX_KEY,
            RELAY_REDIS_URL=redis_url,
            RELAY_WEBHOOK_SECRETS=new_secret(),
            RELAY_SHUTDOWN_TIMEOUT="0",
        )
        stop = asyncio.Event()
        running = asyncio.create_task(process.serve_worker(settings, stop, http_port=port))
        url = f"http://127.0.0.1:{port}/healthz"
        for _ in range(100):
            with contextlib.suppress(httpx.TransportError):
                if await status(url) == 200:
                    break
            await asyncio.sleep(0.05)
        assert await status(url) == 200

        os.kill(redis_proc.pid, signal.SIGSTOP)  # every Redis call now hangs
        await asyncio.sleep(1.6)
        assert await status(url) == 503

        os.kill(redis_proc.pid, signal.SIGCONT)
        await asyncio.sleep(1.0)
        assert await status(url) == 200
        stop.set()
        await asyncio.wait_for(running, timeout=20)
