"""RELAY_REDIS_WAIT_REPLICAS: a new job is on a replica before its caller hears success."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from typing import cast

import chamelaion
import pytest
import redis
from redis.asyncio import Redis

from relay.devtools.embedded_redis import find_redis_server
from relay.devtools.ports import free_port
from relay.errors import NotReplicated
from relay.jobs.store import JobStore
from relay.redis import keys
from tests.helpers import AUDIO, VIDEO
from tests.servers import REDIS_OPTIONS
from tests.stack import RELAY_KEY, eventually, relay_stack


@contextlib.contextmanager
def redis_node(*extra: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server with its own directory (a primary writes a snapshot there for a replica's
    full sync, a replica the snapshot it received), once it answers."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="relay-redis-") as workdir:
        proc = subprocess.Popen(
            [
                *(find_redis_server(), "--port", str(port), "--dir", workdir),
                *(*REDIS_OPTIONS, *extra),
            ],
        )
        url = f"redis://127.0.0.1:{port}/0"
        try:
            eventually(lambda: bool(replication(url)))
            yield url, proc
        finally:
            os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
            proc.wait(timeout=10)


@contextlib.contextmanager
def replica_of(primary_url: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A second redis-server replicating `primary_url`, once its link is up."""
    primary_port = primary_url.rsplit(":", 1)[1].split("/")[0]
    with redis_node("--replicaof", "127.0.0.1", primary_port) as (url, proc):
        eventually(lambda: replication(url).get("master_link_status") == "up")
        yield url, proc


def replication(url: str) -> dict[str, object]:
    client = redis.Redis.from_url(url)
    try:
        return cast(dict[str, object], client.info("replication"))
    except redis.ConnectionError:
        return {}
    finally:
        client.close()


async def test_create_returns_once_a_replica_holds_the_job() -> None:
    with redis_node() as (primary_url, _), replica_of(primary_url) as (replica_url, replica):
        primary = Redis.from_url(primary_url)
        store = JobStore(primary, wait_replicas=1, wait_timeout=2)
        assert await store.create("job-1", callback_url=None, reference_id="r", first_poll_in=5)
        copy = Redis.from_url(replica_url)
        # No waiting here: WAIT returned only after the replica had applied the write.
        assert await copy.exists(keys.job("job-1"), keys.ref("r")) == 2
        assert await copy.zscore(keys.POLLS, "job-1") is not None

        os.kill(replica.pid, signal.SIGSTOP)
        with pytest.raises(NotReplicated) as refused:
            await store.create("job-2", callback_url=None, reference_id=None, first_poll_in=5)
        assert refused.value.status_code == 503
        assert refused.value.headers == {"x-should-retry": "false"}
        assert "job-2" in refused.value.message and "Do not resubmit" in refused.value.message
        # Still tracked on the primary: its polls and callback go on.
        assert await primary.exists(keys.job("job-2")) == 1
        os.kill(replica.pid, signal.SIGCONT)
        await primary.aclose()
        await copy.aclose()


async def test_without_the_option_create_does_not_wait_for_replicas() -> None:
    with redis_node() as (primary_url, _), replica_of(primary_url) as (_, replica):
        primary = Redis.from_url(primary_url)
        os.kill(replica.pid, signal.SIGSTOP)
        assert await JobStore(primary).create(
            "job-1", callback_url=None, reference_id=None, first_poll_in=5
        )
        os.kill(replica.pid, signal.SIGCONT)
        await primary.aclose()


def test_the_sdk_hears_503_and_does_not_resubmit_when_no_replica_confirms() -> None:
    with redis_node() as (primary_url, _), replica_of(primary_url) as (_, replica):
        env = {"RELAY_REDIS_WAIT_REPLICAS": "1", "RELAY_REDIS_WAIT_TIMEOUT": "0.5"}
        with relay_stack(primary_url, workers=0, env=env) as stack:
            os.kill(replica.pid, signal.SIGSTOP)
            # The SDK's default retries are on: a 503 it retried would create a second job.
            sdk = chamelaion.Chamelaion(api_key=RELAY_KEY, base_url=stack.api_url + "/api")
            with pytest.raises(chamelaion.APIStatusError) as refused:
                sdk.lipsync.generate(
                    inputs=[{"type": "video", "url": VIDEO}, {"type": "audio", "url": AUDIO}]
                )
            os.kill(replica.pid, signal.SIGCONT)
            assert refused.value.status_code == 503
            assert "Do not resubmit" in refused.value.response.json()["error"]
            calls = stack.upstream("GET", "/_sandbox/stats").json()["calls"]
            creates = sum(n for route, n in calls.items() if "generate" in route)
            assert creates == 1
            tracked = redis.Redis.from_url(primary_url)
            assert tracked.zcard(keys.POLLS) == 1
            tracked.close()
