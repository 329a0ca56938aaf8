"""A Redis that comes back empty is noticed and reported (log, metric, readiness) until an
operator acknowledges it; a Redis that keeps its data (AOF) across a restart is not."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from relay import cli
from relay.api.app import create_app
from relay.devtools.embedded_redis import find_redis_server
from relay.devtools.ports import free_port
from relay.redis import keys
from relay.redis.watch import RedisWatch
from relay.settings import load_settings
from relay.worker import process
from tests.servers import serve
from tests.stack import RELAY_KEY, SANDBOX_KEY, eventually, new_secret


@contextlib.contextmanager
def redis_server(port: int, workdir: Path, *, aof: bool) -> Iterator[subprocess.Popen[bytes]]:
    """A redis-server on `port`, persisting to `workdir` with AOF when `aof`."""
    proc = subprocess.Popen(
        [
            find_redis_server(),
            *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)),
            *("--save", "", "--appendonly", "yes" if aof else "no", "--loglevel", "warning"),
        ],
    )
    try:
        client = redis.Redis(port=port)
        eventually(lambda: _answers(client))
        client.close()
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def ready(url: str) -> httpx.Response:
    return httpx.get(url + "/readyz", timeout=10)


def data_lost_metric(url: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("relay_redis_data_lost "):
            return float(line.split()[1])
    raise AssertionError("relay_redis_data_lost is not exported")


def test_a_flushed_redis_fails_readiness_until_acknowledged(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = load_settings(
        CHAMELAION_API_KEY=SANDBOX_KEY, RELAY_REDIS_URL=redis_url, RELAY_API_KEYS=RELAY_KEY
    )
    client = redis.Redis.from_url(redis_url)
    with serve(create_app(settings)) as api_url:
        assert ready(api_url).status_code == 200
        assert client.get(keys.EPOCH), "the first process writes the epoch marker"
        assert data_lost_metric(api_url) == 0

        client.flushall()
        with caplog.at_level(logging.ERROR, logger="relay.redis.watch"):
            answer = ready(api_url)
        assert answer.status_code == 503
        assert answer.json()["status"] == "data lost"
        assert "Redis lost the relay's data" in answer.json()["error"]
        assert any("relay ack-data-loss" in record.getMessage() for record in caplog.records)
        assert data_lost_metric(api_url) == 1
        # Still reported after the relay has written its new marker: the loss is recorded.
        assert ready(api_url).status_code == 503
        assert client.get(keys.DATA_LOST)

        monkeypatch.setenv("RELAY_REDIS_URL", redis_url)
        assert cli.main(["ack-data-loss"]) == 0
        assert ready(api_url).status_code == 200
        assert data_lost_metric(api_url) == 0
    client.close()


async def test_a_restart_without_persistence_is_noticed_by_the_worker(tmp_path: Path) -> None:
    port, http_port = free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{port}/0"
    settings = load_settings(
        CHAMELAION_API_KEY=SANDBOX_KEY,
        RELAY_REDIS_URL=redis_url,
        RELAY_WEBHOOK_SECRETS=new_secret(),
        RELAY_SHUTDOWN_TIMEOUT="0",
        RELAY_REDIS_TIMEOUT="0.5",
    )
    stop = asyncio.Event()
    url = f"http://127.0.0.1:{http_port}"

    async def status() -> int:
        async with httpx.AsyncClient() as client:
            with contextlib.suppress(httpx.TransportError):
                return (await client.get(url + "/readyz", timeout=10)).status_code
            return 0

    async def until(wanted: int) -> None:
        for _ in range(200):
            if await status() == wanted:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"worker readiness never became {wanted}")

    with redis_server(port, tmp_path, aof=False):
        running = asyncio.create_task(process.serve_worker(settings, stop, http_port=http_port))
        await until(200)
    # Down: unready, but not "data lost" yet (nothing can be known).
    await until(503)
    with redis_server(port, tmp_path, aof=False):
        await until(503)
        async with httpx.AsyncClient() as client:
            answer = await client.get(url + "/readyz", timeout=10)
        assert answer.json()["status"] == "data lost"
        # Liveness stays up: restarting the worker would not bring the data back.
        async with httpx.AsyncClient() as client:
            assert (await client.get(url + "/healthz", timeout=10)).status_code == 200
        stop.set()
        await asyncio.wait_for(running, timeout=30)


def test_a_restart_with_aof_keeps_the_marker_and_raises_no_alarm(tmp_path: Path) -> None:
    port = free_port()
    redis_url = f"redis://127.0.0.1:{port}/0"
    settings = load_settings(
        CHAMELAION_API_KEY=SANDBOX_KEY,
        RELAY_REDIS_URL=redis_url,
        RELAY_API_KEYS=RELAY_KEY,
        RELAY_REDIS_TIMEOUT="0.5",
    )
    with serve(create_app(settings)) as api_url:
        with redis_server(port, tmp_path, aof=True):
            eventually(lambda: ready(api_url).status_code == 200)
        assert ready(api_url).status_code == 503  # unreachable meanwhile
        with redis_server(port, tmp_path, aof=True):
            eventually(lambda: ready(api_url).status_code == 200)
            assert ready(api_url).json() == {"status": "ok"}


def headroom() -> float | None:
    return REGISTRY.get_sample_value("relay_redis_memory_headroom_ratio")


async def test_memory_headroom_is_reported_and_warned_about_before_redis_is_full(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = Redis.from_url(redis_url)
    watch = RedisWatch(client)
    await watch.check()
    assert headroom() == 1.0  # no maxmemory: no limit
    used = int((await client.info("memory"))["used_memory"])
    await client.config_set("maxmemory", int(used / 0.85))
    try:
        with caplog.at_level(logging.WARNING, logger="relay.redis.watch"):
            await watch.check()
        headroom_now = headroom()
        assert headroom_now is not None and 0 < headroom_now < 0.2
        assert any("Redis memory is" in record.getMessage() for record in caplog.records)
    finally:
        await client.config_set("maxmemory", 0)
        await client.aclose()
