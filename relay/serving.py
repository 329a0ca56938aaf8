"""uvicorn servers that share an event loop with other work (worker health port, `relay dev`).

uvicorn normally takes over SIGINT/SIGTERM; a process that runs several servers, or a server
beside the arq worker, handles signals once itself and stops each server by `should_exit`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator

import uvicorn


class EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def embedded_server(
    app: object, *, host: str, port: int, log_level: str = "warning"
) -> EmbeddedServer:
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        lifespan="on",
    )
    return EmbeddedServer(config)
