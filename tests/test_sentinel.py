"""Redis behind Sentinel: the URL form, and a whole job run through a real sentinel."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from relay.devtools.embedded_redis import find_redis_server
from relay.devtools.ports import free_port
from relay.errors import ConfigError
from relay.redis.conn import redacted
from relay.settings import SentinelTarget, load_settings, parse_sentinel_url
from tests.helpers import submit, verified
from tests.stack import relay_stack


def test_sentinel_urls_parse() -> None:
    assert parse_sentinel_url("redis+sentinel://:p%40ss@s1:26379,[::1]:26380/mymaster/2") == (
        SentinelTarget((("s1", 26379), ("::1", 26380)), "mymaster", 2, "p@ss")
    )
    assert parse_sentinel_url("redis+sentinel://s1:26379/main").db == 0


@pytest.mark.parametrize(
    "url", ["redis+sentinel://s1/main", "redis+sentinel://s1:26379/", "redis+sentinel://s1:1/m/x"]
)
def test_bad_sentinel_urls_are_refused_without_echoing_them(url: str) -> None:
    with pytest.raises(ConfigError, match="RELAY_REDIS_URL") as error:
        load_settings(RELAY_REDIS_URL=url)
    assert url not in str(error.value)


@contextlib.contextmanager
def sentinel_for(redis_url: str, tmp_path: Path) -> Iterator[str]:
    master = urlsplit(redis_url)
    port = free_port()
    config = tmp_path / "sentinel.conf"
    config.write_text(
        f"port {port}\nbind 127.0.0.1\nloglevel warning\n"
        f"sentinel monitor relaymaster 127.0.0.1 {master.port} 1\n"
    )
    # Its log goes to the test's output, shown when the test fails.
    proc = subprocess.Popen([find_redis_server(), str(config), "--sentinel"])
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.execute_command(  # type: ignore[no-untyped-call]
                    "SENTINEL", "get-master-addr-by-name", "relaymaster"
                ):
                    break
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("sentinel did not come up")
            time.sleep(0.05)
        client.close()
        yield f"redis+sentinel://127.0.0.1:{port}/relaymaster/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_job_runs_end_to_end_through_sentinel(redis_url: str, tmp_path: Path) -> None:
    with sentinel_for(redis_url, tmp_path) as sentinel_url, relay_stack(sentinel_url) as stack:
        request_id = submit(stack)
        [callback] = stack.receiver.wait_for(1)
        payload = verified(stack, callback)
        assert payload["type"] == "lipsync.completed"
    # The job lives on the master the sentinel pointed to.
    assert redis.Redis.from_url(redis_url).exists(f"relay:job:{request_id}") == 1


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rediss://relay:s3cret@redis:6380/1", "rediss://relay:***@redis:6380/1"),
        (
            "redis+sentinel://:s3cret@a:26379,b:26379/mymaster",
            "redis+sentinel://:***@a:26379,b:26379/mymaster",
        ),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
    ],
)
def test_printed_redis_urls_hide_their_password(url: str, shown: str) -> None:
    assert redacted(url) == shown
