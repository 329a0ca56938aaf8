"""Shared fixtures: one real redis-server per test session, a clean database per test."""

from __future__ import annotations

import functools
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import httpx._transports.default
import hypothesis
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from xdist.scheduler import LoadScopeScheduling

from relay.devtools.embedded_redis import embedded_redis
from tests.helpers import close_test_clients

# Hypothesis's per-example deadline (200 ms) is a timed assertion: on a loaded 2-core machine an
# example that takes 0.2 ms alone took 460 ms once, and the run failed as "flaky". What a property
# test checks is the property; how fast it runs is bench/'s business.
hypothesis.settings.register_profile("relay", deadline=None)
hypothesis.settings.load_profile("relay")


def _one_default_ssl_context() -> None:
    """Every httpx client builds its SSL context, loading certifi's CA bundle: 35 ms of CPU
    alone, 140 ms on the loaded machine, and the tests make thousands of short-lived clients
    (httpx.get, the SDK, a stack's helpers) that only ever speak plain HTTP to loopback: 290 of
    them took 41 s of a 173 s run. Each test process builds the default one once and shares it
    (an SSLContext is made to be shared); any other verify or cert still gets its own."""
    build = httpx.create_ssl_context
    default = functools.cache(build)

    def create_ssl_context(
        verify: ssl.SSLContext | str | bool = True, cert: Any = None, trust_env: bool = True
    ) -> ssl.SSLContext:
        if verify is True and cert is None and trust_env:
            return default()
        return build(verify=verify, cert=cert, trust_env=trust_env)

    # Where httpx's transports look it up (its module imported the name).
    httpx._transports.default.create_ssl_context = create_ssl_context  # type: ignore[attr-defined]


_one_default_ssl_context()

# Set by the run that made the bytecode cache below (under xdist: the controller), which alone
# removes it at the end.
_OWN_PYCACHE = "_RELAY_TESTS_OWN_PYCACHE"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "long: the test takes tens of seconds (mostly waiting); xdist hands it out early, so "
        "it does not start last and set the length of the run",
    )
    # Hundreds of `relay worker` and other Python subprocesses start during a run. Where
    # PYTHONDONTWRITEBYTECODE is set (as on this project's machines) each of them would compile
    # every module it imports from source again, a couple of CPU seconds apiece. Children get a
    # bytecode cache of their own for the run instead, outside the source tree and the venv.
    if os.environ.get("PYTHONDONTWRITEBYTECODE") and not os.environ.get("PYTHONPYCACHEPREFIX"):
        del os.environ["PYTHONDONTWRITEBYTECODE"]
        os.environ["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="relay-tests-pyc-")
        os.environ[_OWN_PYCACHE] = str(os.getpid())
        if (config.getoption("numprocesses", None) or 0) > 1:
            _fill_bytecode_cache(config)


def _fill_bytecode_cache(config: pytest.Config) -> None:
    """Compile what each xdist process imports, once, before they start. Each of them collects
    the whole suite (a few thousand modules of the relay, the test tools and their
    dependencies): from an empty bytecode cache that is 7.5 s of CPU apiece, mostly compiling,
    and they all start at once, so none finds another's work; from a full one, 2.5 s. Two
    collections of half the suite each, side by side, fill it."""
    modules = sorted(str(path) for path in (config.rootpath / "tests").glob("test_*.py"))
    collect = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-n", "0"]
    collections = [
        subprocess.Popen(
            [*collect, "-p", "no:cacheprovider", *half],
            cwd=config.rootpath,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for half in (modules[0::2], modules[1::2])
    ]
    # Only a head start: whatever these find wrong, the real collection reports.
    for collection in collections:
        collection.wait()


# A test marked `@pytest.mark.long`, as the scheduler (which sees node ids, not marks) finds it
# in its module's text: the name of the first function defined after the mark.
LONG_MARK = re.compile(r"^@pytest\.mark\.long\b.*?^(?:async )?def (\w+)", re.MULTILINE | re.DOTALL)


class ByTestScheduling(LoadScopeScheduling):  # type: ignore[misc]  # xdist is untyped
    """xdist hands tests to its processes one by one, so one long file no longer sets the
    length of the run; but the tests of a module that declares a module-scoped fixture (a
    rendered chart, a browser, a checkov run) stay together on one process, so the fixture is
    made once. (xdist's own loadgroup marks cannot do this under pytest 9: the suffix it adds
    to a test's id no longer changes the id.)

    Longest first: those modules (xdist orders units by their number of tests), then the
    tests marked `long`, then the rest in collection order. A long test handed out last would
    run alone at the end while the other processes sit idle."""

    def __init__(self, config: pytest.Config, log: Any = None) -> None:
        super().__init__(config, log)
        self.root = config.rootpath
        self.ordered = False

    @functools.cache  # noqa: B019 - one scheduler per run
    def text(self, module: str) -> str:
        return (self.root / module).read_text()

    @functools.cache  # noqa: B019 - one scheduler per run
    def long_tests(self, module: str) -> frozenset[str]:
        return frozenset(found.group(1) for found in LONG_MARK.finditer(self.text(module)))

    def keeps_together(self, module: str) -> bool:
        return 'scope="module"' in self.text(module)

    def _split_scope(self, nodeid: str) -> str:
        module = nodeid.split("::", 1)[0]
        return module if self.keeps_together(module) else nodeid

    def rank(self, scope: str) -> int:
        module, _, test = scope.partition("::")
        if not test:
            return 0
        return 1 if test.split("[", 1)[0] in self.long_tests(module) else 2

    def _assign_work_unit(self, node: Any) -> None:
        if not self.ordered:  # the queue is complete by the first assignment
            self.ordered = True
            for scope in sorted(self.workqueue, key=self.rank):
                self.workqueue.move_to_end(scope)
        super()._assign_work_unit(node)


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    # Only for the default `--dist loadscope` (pyproject's addopts); another --dist is xdist's.
    if config.getvalue("dist") == "loadscope":
        return ByTestScheduling(config, log)
    return None


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


@pytest.fixture(autouse=True)
def _close_test_clients() -> Iterator[None]:
    """Clients a test made with tests.helpers.closed_after_test (the console's) close after it."""
    yield
    close_test_clients()
