"""Connecting to Redis from RELAY_REDIS_URL: standalone, TLS, unix socket or Sentinel (its URL
is read by relay.settings.parse_sentinel_url). Redis Cluster is not supported: arq needs its
queue's keys on one node.
"""

from __future__ import annotations

from typing import Any, TypeVar
from urllib.parse import urlsplit

from arq.connections import ArqRedis
from redis.asyncio import Redis
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from relay.redis import keys
from relay.settings import SENTINEL_SCHEME, parse_sentinel_url

R = TypeVar("R", bound=Redis)


def _client(redis_class: type[R], url: str, timeout: float) -> R:
    """A lazily connecting client whose every connect and reply is bounded by `timeout`.

    Without a read timeout a stalled Redis (failover, fsync stall, SIGSTOP) hangs every call
    until something else cancels it; with one the call raises redis.TimeoutError, a RedisError
    that callers already handle. The relay sends no blocking commands (arq polls its queue
    with ZRANGEBYSCORE, and WAIT is kept below this timeout), so no reply may take longer.
    """
    bounds: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if url.startswith(SENTINEL_SCHEME + "://"):
        target = parse_sentinel_url(url)
        # redis-py gives the sentinels' own connections the same socket_* bounds.
        sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
            list(target.sentinels), password=target.password, db=target.db, **bounds
        )
        master: R = sentinel.master_for(target.master, redis_class=redis_class)
        return master
    client: R = redis_class.from_url(url, **bounds)
    return client


def connect(url: str, *, timeout: float) -> Redis:
    """A client for the API process (connections are made lazily)."""
    return _client(Redis, url, timeout)


async def close(client: Redis) -> None:
    """Close a client from `connect`, including a Sentinel pool and its sentinel clients
    (redis-py leaves both open when the pool was handed to the client)."""
    await client.aclose()
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        await pool.disconnect()
        for sentinel in pool.sentinel_manager.sentinels:
            await sentinel.aclose()


async def arq_pool(url: str, *, timeout: float) -> ArqRedis:
    """The worker's one Redis pool, shared by arq and the relay's own scripts.

    Built here rather than by arq's create_pool, whose settings have no read timeout.
    """
    pool = _client(ArqRedis, url, timeout)
    pool.default_queue_name = keys.ARQ_QUEUE
    return pool


def arq_view(redis: Redis) -> ArqRedis:
    """arq's client on `redis`'s own connections (the API queues redeliveries with it)."""
    return ArqRedis(redis.connection_pool, default_queue_name=keys.ARQ_QUEUE)


def redacted(url: str) -> str:
    """`url` fit to print: any password in it replaced by `***`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user, _, _ = parts.netloc.rpartition("@")[0].partition(":")
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()
