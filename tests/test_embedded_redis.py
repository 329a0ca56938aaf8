"""The embedded redis-server really serves and really goes away."""

from __future__ import annotations

import redis

from relay.devtools.embedded_redis import embedded_redis


def test_embedded_redis_serves_and_stops() -> None:
    with embedded_redis() as url:
        client = redis.Redis.from_url(url)
        assert client.ping()
        client.set("k", "v")
        assert client.get("k") == b"v"
        client.close()
    stopped = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    try:
        stopped.ping()
    except redis.ConnectionError:
        pass
    else:
        raise AssertionError("redis-server still answers after the context ended")
    finally:
        stopped.close()
