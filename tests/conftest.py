"""Shared fixtures: one real redis-server per test session, a clean database per test."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from relay.devtools.embedded_redis import embedded_redis

# Set by the run that made the bytecode cache below (under xdist: the controller), which alone
# removes it at the end.
_OWN_PYCACHE = "_RELAY_TESTS_OWN_PYCACHE"


def pytest_configure(config: pytest.Config) -> None:
    # Hundreds of `relay worker` and other Python subprocesses start during a run. Where
    # PYTHONDONTWRITEBYTECODE is set (as on this project's machines) each of them would compile
    # every module it imports from source again, a couple of CPU seconds apiece. Children get a
    # bytecode cache of their own for the run instead, outside the source tree and the venv.
    if os.environ.get("PYTHONDONTWRITEBYTECODE") and not os.environ.get("PYTHONPYCACHEPREFIX"):
        del os.environ["PYTHONDONTWRITEBYTECODE"]
        os.environ["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="relay-tests-pyc-")
        os.environ[_OWN_PYCACHE] = str(os.getpid())


def pytest_unconfigure(config: pytest.Config) -> None:
    if os.environ.get(_OWN_PYCACHE) == str(os.getpid()):
        shutil.rmtree(os.environ["PYTHONPYCACHEPREFIX"], ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    with embedded_redis() as url:
        yield url


@pytest.fixture
def redis_url(redis_server_url: str) -> str:
    """The session's Redis, emptied before each test so tests never see each other's keys."""
    client = SyncRedis.from_url(redis_server_url)
    client.flushall()
    client.close()
    return redis_server_url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    """An asyncio client of the test's (emptied) Redis."""
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()
