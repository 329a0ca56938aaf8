"""The API's responses counted by status class (`relay_http_responses_total`), for its error
ratio: what the relay's callers got, so probes and scrapes are left out.

Counted where the status is sent, outside every route and error handler: a request whose
handler raised is counted 5xx here, as Starlette's outermost layer then answers 500. The 503s
past RELAY_HTTP_MAX_CONCURRENCY and the 431s for oversized headers are answered before any app
runs; relay.api.protocol counts those.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relay.metrics import HTTP_RESPONSES

UNCOUNTED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_CLASSES = {n: HTTP_RESPONSES.labels(f"{n}xx") for n in range(1, 6)}


def count_response(status: int, count: int = 1) -> None:
    counter = _CLASSES.get(status // 100)
    if counter is not None:
        counter.inc(count)


def counted(scope: Mapping[str, object]) -> bool:
    return scope["type"] == "http" and scope["path"] not in UNCOUNTED_PATHS


class ResponseCounter:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not counted(scope):
            await self.app(scope, receive, send)
            return
        started = False

        async def send_counted(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                count_response(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except Exception:
            if not started:
                count_response(500)
            raise
