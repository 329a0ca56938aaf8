"""uvicorn servers: the API's limits against slow clients, and servers that share a loop.

uvicorn normally takes over SIGINT/SIGTERM; a process that runs several servers, or a server
beside the arq worker, handles signals once itself and stops each server by `should_exit`.

uvicorn bounds idle time between requests (keep-alive) and the number of connections and
requests in flight (`limit_concurrency`, answered 503 beyond), but not the time a client takes
to send a request's headers: a client that opens connections and sends a byte now and then
would hold each one for ever. `HeaderTimeoutProtocol` closes a connection whose request
headers are not complete within RELAY_HTTP_HEADER_TIMEOUT of its first byte (or of the
connection's opening). Bodies are bounded by the routes: RELAY_HTTP_BODY_TIMEOUT for JSON,
the stall window and minimum rate for uploads.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Generator
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from relay.api.response_counts import count_response, counted
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


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing connections that are slow to send headers and
    counting the 503s uvicorn answers itself past its concurrency limit."""

    header_timeout = 10.0  # set per server by `_with_header_timeout`
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        # uvicorn's own test, made before it starts the request (it answers 503 instead);
        # a new cycle means a request was started (an upgrade is handed off instead).
        limit = self.limit_concurrency
        over = limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit)
        cycle = self.cycle
        super().on_headers_complete()
        if over and self.cycle is not cycle and counted(self.scope):
            count_response(503)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def _with_header_timeout(seconds: float) -> type[HeaderTimeoutProtocol]:
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": seconds})


def api_options(settings: Settings) -> dict[str, Any]:
    """uvicorn.Config options for the API: its limits against slow and greedy clients."""
    return {
        "http": _with_header_timeout(settings.http_header_timeout),
        "timeout_keep_alive": settings.http_keepalive_timeout,
        "limit_concurrency": settings.http_max_concurrency,
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
