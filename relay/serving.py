"""uvicorn servers: the API's, with its limits against slow and greedy clients
(relay.api.protocol), and servers that share a loop.

uvicorn normally takes over SIGINT/SIGTERM; a process that runs several servers, or a server
beside the arq worker, handles signals once itself and stops each server by `should_exit`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from typing import Any

import uvicorn

from relay.api.protocol import Limits, protocol_class
from relay.settings import Settings


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


def api_options(settings: Settings) -> dict[str, Any]:
    """uvicorn.Config options for the API: its limits against slow and greedy clients."""
    return {
        "http": protocol_class(
            Limits(
                header_timeout=settings.http_header_timeout,
                max_requests=settings.http_max_concurrency,
                max_connections=settings.http_max_connections,
                max_connections_per_peer=settings.http_max_connections_per_peer,
            )
        ),
        "timeout_keep_alive": settings.http_keepalive_timeout,
        # X-Forwarded-Proto and -For count only from these (the console's Secure cookies).
        "proxy_headers": True,
        "forwarded_allow_ips": settings.forwarded_allow_ips,
        # In-flight requests get RELAY_SHUTDOWN_TIMEOUT to finish, then are cancelled. A create
        # cut off then (or by SIGKILL) is not lost: its intent, written before the upstream
        # call, is reconciled by a worker (relay.jobs.intents), so the grace need not cover
        # RELAY_UPSTREAM_TIMEOUT.
        "timeout_graceful_shutdown": round(settings.shutdown_timeout),
    }


def api_config(app: Any, settings: Settings, *, host: str, **options: Any) -> uvicorn.Config:
    """The API's uvicorn configuration, on RELAY_API_PORT."""
    return uvicorn.Config(
        app,
        host=host,
        port=settings.api_port,
        access_log=False,
        **api_options(settings),
        **options,
    )


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
