"""The submission's span: a submit route run inside a server span that continues the caller's
W3C `traceparent`/`tracestate`, or starts a trace when it sent none.

The span is the current one while the route runs, so the upstream create is its child
(relay.upstream) and the job keeps its context (relay.api.submit); nothing happens here when
tracing is off but one test of the tracer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.requests import Request
from starlette.responses import Response

from relay.errors import ApiError
from relay.tracing import setup, spans

Endpoint = Callable[[Request], Awaitable[Response]]


def traced(endpoint: Endpoint, route: str) -> Endpoint:
    """`endpoint` (served at `route`, the path template) in a submission span when tracing."""

    async def in_span(request: Request) -> Response:
        tracer = setup.active()
        if tracer is None:
            return await endpoint(request)
        attributes: dict[str, str | int] = {
            "http.request.method": request.method,
            "http.route": route,
            "url.path": request.url.path,
            "url.scheme": request.url.scheme,
        }
        if request.url.hostname:
            attributes["server.address"] = request.url.hostname
        with tracer.start_as_current_span(
            f"{request.method} {route}",
            context=spans.incoming(request.headers),
            kind=SpanKind.SERVER,
            attributes=attributes,
            # Errors are the API's answers, recorded as status codes below, not as exceptions
            # with their messages (which can quote what the caller sent).
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                response = await endpoint(request)
            except ApiError as exc:
                _answered(span, exc.status_code)
                raise
            except Exception as exc:
                span.set_attribute("error.type", type(exc).__qualname__)
                span.set_status(Status(StatusCode.ERROR))
                raise
            _answered(span, response.status_code)
            return response

    return in_span


def _answered(span: trace.Span, status: int) -> None:
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        # Server spans count only 5xx as errors (the semantic conventions' rule).
        span.set_attribute("error.type", str(status))
        span.set_status(Status(StatusCode.ERROR))
