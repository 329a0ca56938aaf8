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
        scope = request.scope
        method = scope["method"]
        # The semantic conventions' required and recommended ones (server.address is opt-in).
        attributes = {
            "http.request.method": method,
            "http.route": route,
            "url.path": scope["path"],
            "url.scheme": scope["scheme"],
        }
        span = tracer.start_span(
            f"{method} {route}",
            context=spans.from_scope(scope["headers"]),
            kind=SpanKind.SERVER,
            attributes=attributes,
        )
        # Current for the relay's spans while the route runs (spans.SUBMISSION says why not
        # through OpenTelemetry's context).
        token = spans.SUBMISSION.set(span)
        try:
            response = await endpoint(request)
            _answered(span, response.status_code)
            return response
        except ApiError as exc:
            # Errors are the API's answers, recorded as status codes, not as exceptions with
            # their messages (which can quote what the caller sent).
            _answered(span, exc.status_code)
            raise
        except Exception as exc:
            span.set_attribute("error.type", type(exc).__qualname__)
            span.set_status(Status(StatusCode.ERROR))
            raise
        finally:
            spans.SUBMISSION.reset(token)
            span.end()

    return in_span


def _answered(span: trace.Span, status: int) -> None:
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        # Server spans count only 5xx as errors (the semantic conventions' rule).
        span.set_attribute("error.type", str(status))
        span.set_status(Status(StatusCode.ERROR))
