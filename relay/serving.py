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


class ProcessServer(uvicorn.Server):
    """The server of a process of its own (`relay api`): SIGTERM drains it and exits 0.

    uvicorn re-raises the signal it caught once it has shut down, so the process would die of
    it (exit 143), which Kubernetes and supervisors read as a crash after a clean drain.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()


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
