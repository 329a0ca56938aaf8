"""Real servers on loopback for the tests: any ASGI app under uvicorn in a background thread, and
a redis-server of a test's own (to stop, hang or kill)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
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
