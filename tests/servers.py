"""Real servers on loopback for the tests: any ASGI app under uvicorn in a background thread, and
a redis-server of a test's own (to stop, hang or kill)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from relay.devtools.embedded_redis import find_redis_server
from relay.devtools.ports import free_port
from relay.serving import EmbeddedServer


class TestServer(EmbeddedServer):
    """A server of the tests: one that stops at once when told to, not at uvicorn's next tick
    (0.1 s), which every one of the suite's few hundred stacks waited for, three at a time."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.thread = threading.Thread(target=self.run, name=f"uvicorn:{config.port}", daemon=True)
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def main_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.1)

    def stop(self) -> None:
        """Tell it to stop (from any thread); `join` waits for it."""
        self.should_exit = True
        if self._loop is not None and self._wake is not None:
            with contextlib.suppress(RuntimeError):  # its loop has closed already
                self._loop.call_soon_threadsafe(self._wake.set)

    def join(self) -> None:
        self.thread.join(timeout=30)


def start_server(app: ASGIApp, *, port: int | None = None, **options: Any) -> TestServer:
    """`app` served on 127.0.0.1 (`port`, or a free one) once it has started; `options` go to
    uvicorn.Config (the API's limits: `relay.serving.api_options`)."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port or free_port(),
        log_level="warning",
        lifespan="on",
        loop="asyncio",
        **options,
    )
    server = TestServer(config)
    server.thread.start()
    # Its start-up (the API's lifespan connects, loads scripts) waits on nothing but this
    # machine: bounded only against a hang.
    deadline = time.monotonic() + 60
    while not server.started:
        if not server.thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"test server on port {config.port} did not start")
        time.sleep(0.01)
    return server


def url_of(server: TestServer) -> str:
    return f"http://127.0.0.1:{server.config.port}"


@contextlib.contextmanager
def serve(app: ASGIApp, *, port: int | None = None, **options: Any) -> Iterator[str]:
    """Serve `app` on 127.0.0.1 and yield its base URL until the block ends; `options` go to
    uvicorn.Config (the API's limits: `relay.serving.api_options`)."""
    with servers() as started:
        yield url_of(started(app, port=port, **options))


@contextlib.contextmanager
def servers() -> Iterator[Callable[..., TestServer]]:
    """Start servers in the block (`start(app, **options)`, as start_server); at its end they
    are all told to stop at once, then waited for, last started first."""
    running: list[TestServer] = []

    def start(app: ASGIApp, **options: Any) -> TestServer:
        server = start_server(app, **options)
        running.append(server)
        return server

    try:
        yield start
    finally:
        for server in reversed(running):
            server.stop()
        for server in reversed(running):
            server.join()


# A test's own redis-server: no persistence, and a log of warnings only (on its stdout, which
# pytest captures and shows when the test fails).
REDIS_OPTIONS = ("--save", "", "--appendonly", "no", "--loglevel", "warning")


@contextlib.contextmanager
def own_redis() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of the test's own, not the session's: yields its URL and its process."""
    port = free_port()
    # Its log (warnings only) goes to the test's output, shown when the test fails.
    proc = subprocess.Popen(
        [find_redis_server(), *REDIS_OPTIONS, "--port", str(port)],
    )
    try:
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(timeout=10)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[str]:
    """A raw HTTP server on loopback: `handler` answers (or not) once the request head is in."""
    handling: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handling.add(task)
        try:
            await reader.readuntil(b"\r\n\r\n")
            await handler(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    listening = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        listening.close()
        for task in handling:
            task.cancel()
        await asyncio.gather(*handling, return_exceptions=True)
        await listening.wait_closed()


async def answer(writer: asyncio.StreamWriter, raw: bytes) -> None:
    writer.write(raw)
    await writer.drain()


async def too_many_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    padding = b"".join(b"x-padding-%d: x\r\n" % number for number in range(300))
    await answer(writer, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n" + padding + b"\r\n{}")
