"""Real servers on loopback for the tests: any ASGI app under uvicorn in a background thread."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from relay.devtools.embedded_redis import free_port
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
