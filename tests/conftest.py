"""Shared fixtures: one real redis-server per test session, a clean database per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from relay.devtools.embedded_redis import embedded_redis


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    with embedded_redis() as url:
        yield url


@pytest.fixture
def redis_url(redis_server_url: str) -> str:
    """The session's Redis, emptied before each test so tests never see each other's keys."""
    client = redis.Redis.from_url(redis_server_url)
    client.flushall()
    client.close()
    return redis_server_url
