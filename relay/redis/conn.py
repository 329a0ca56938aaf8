"""Connecting to Redis from RELAY_REDIS_URL: standalone, TLS, unix socket or Sentinel.

Sentinel is written `redis+sentinel://[:password@]host:port[,host:port...]/master-name[/db]`:
the sentinels to ask, the name of the monitored master, and the database. The password is the
master's. Redis Cluster is not supported: arq needs its queue's keys on one node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from arq.connections import ArqRedis
from redis.asyncio import Redis
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from relay.redis import keys

SENTINEL_SCHEME = "redis+sentinel"

R = TypeVar("R", bound=Redis)


@dataclass(frozen=True)
class SentinelTarget:
    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int
    password: str | None


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Raise ValueError (without echoing the URL, which may hold a password) when malformed."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        raise ValueError(f"must start with {SENTINEL_SCHEME}://")
    credentials, _, hosts = parts.netloc.rpartition("@")
    sentinels: list[tuple[str, int]] = []
    for entry in hosts.split(","):
        host, _, port = entry.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError("each sentinel must be host:port")
        sentinels.append((host.strip("[]"), int(port)))
    path = [segment for segment in parts.path.split("/") if segment]
    if not 1 <= len(path) <= 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("the path must be /master-name or /master-name/db")
    password = unquote(credentials.partition(":")[2]) if credentials else None
    return SentinelTarget(
        tuple(sentinels), path[0], int(path[1]) if len(path) == 2 else 0, password or None
    )


def check_redis_url(url: str) -> None:
    if url.startswith(SENTINEL_SCHEME + "://"):
        parse_sentinel_url(url)
    elif not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"must be a redis://, rediss://, unix:// or {SENTINEL_SCHEME}:// URL")


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
