"""What the stages share to trace a job: its context kept as text with the job, the W3C headers
that carry it, and HTTP attributes after the OpenTelemetry semantic conventions.

A job's context is its submission span's, kept in the job's hash as `traceparent` (and, when
the caller sent one, a newline and `tracestate`): any process rebuilds it from there, so the
job's later spans (the end, each attempt) join the submission's trace whichever worker makes
them. Only the trace's ids travel: no payload, no secret, no callback URL.

Every function here is called only once `relay.tracing.setup.active()` gave a tracer.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_W3C = TraceContextTextMapPropagator()
_NO_PARENT = Context()
# The context of a span that starts a trace of its own (a sweep page's).
ROOT = _NO_PARENT


def incoming(headers: Mapping[str, str]) -> Context:
    """The caller's context from its `traceparent`/`tracestate` (an empty one without)."""
    carrier = {name: headers[name] for name in ("traceparent", "tracestate") if name in headers}
    return _W3C.extract(carrier, context=_NO_PARENT) if carrier else _NO_PARENT


def keep(span: Span | None = None) -> str | None:
    """`span`'s context (default: the current span's) as text to store with a job; None when
    there is none to keep. Written directly (on every traced submission), in the form the
    propagator reads back."""
    span = span if span is not None else trace.get_current_span()
    context = span.get_span_context()
    if not context.is_valid:
        return None
    kept = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    if context.trace_state:
        return f"{kept}\n{context.trace_state.to_header()}"
    return kept


def restore(kept: str | None) -> Context | None:
    """The context `keep` wrote (None when the job has none, or it is unreadable)."""
    if not kept:
        return None
    traceparent, _, tracestate = kept.partition("\n")
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    context = _W3C.extract(carrier, context=_NO_PARENT)
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def link_to(kept: str | None) -> trace.SpanContext | None:
    """The span context of a kept job context, to link a span to (None without one)."""
    context = restore(kept)
    if context is None:
        return None
    return trace.get_current_span(context).get_span_context()


def headers(span: Span) -> dict[str, str]:
    """The W3C headers that continue `span`'s trace in the request it makes."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def client_attributes(
    method: str, scheme: str, host: str, port: int | None
) -> dict[str, str | int]:
    """An HTTP client span's attributes: where it went, never the path's query or userinfo."""
    attributes: dict[str, str | int] = {
        "http.request.method": method,
        "server.address": host,
        "url.scheme": scheme,
    }
    if port is not None:
        attributes["server.port"] = port
    return attributes
