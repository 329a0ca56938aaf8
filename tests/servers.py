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

from relay.devtools.embedded_redis import find_redis_server, free_port
from relay.serving import EmbeddedServer


@contextlib.contextmanager
def serve(app: ASGIApp, *, port: int | None = None, **options: Any) -> Iterator[str]:
    """Serve `app` on 127.0.0.1 and yield its base URL until the block ends; `options` go to
    uvicorn.Config (the API's limits: `relay.serving.api_options`)."""
    port = port or free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
        loop="asyncio",
        **options,
    )
    server = EmbeddedServer(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn:{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"test server on port {port} did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


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
