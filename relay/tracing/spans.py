"""What the stages share to trace a job: its context kept as text with the job, the W3C headers
that carry it, and HTTP attributes after the OpenTelemetry semantic conventions.

A job's context is its submission span's, kept in the job's hash as `traceparent` (and, when
the caller sent one, a newline and `tracestate`): any process rebuilds it from there, so the
job's later spans (the end, each attempt) join the submission's trace whichever worker makes
them. Only the trace's ids travel: no payload, no secret, no callback URL.

The W3C headers are read and written here directly, as the SDK's propagator reads and writes
them (tests/test_tracing.py checks both agree), without the carriers and contexts it builds on
every call. Every function here is called only once `relay.tracing.setup.active()` gave a
tracer.
"""

from __future__ import annotations

import functools
import re
from contextvars import ContextVar

from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN_CONTEXT, Span, SpanContext, TraceFlags, TraceState

# The submission's span while its route runs (relay.api.traced), where the relay's own code
# (the upstream create's span, the job's kept context) looks first for the current span. On
# that path, attaching it to OpenTelemetry's context and reading it back (three times a
# request) cost more than a span's record; everywhere else the relay's spans are current
# through the OpenTelemetry API (`trace.use_span`), as `current_span` falls back to.
SUBMISSION: ContextVar[Span | None] = ContextVar("relay_submission_span", default=None)


def current_span() -> Span:
    """The submission's span while its route runs, else OpenTelemetry's current span."""
    span = SUBMISSION.get()
    return span if span is not None else trace.get_current_span()


# The parent of a span that starts a trace of its own (a sweep page's): none.
ROOT = INVALID_SPAN_CONTEXT

# W3C trace context's traceparent: version, trace id, parent id, flags; a later version may
# add fields after a dash (version 00 may not, and ff is no version).
_TRACEPARENT = re.compile(
    r"[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?[ \t]*"
)
_FLAGS = [TraceFlags(flags) for flags in range(256)]
# A tracestate list member: a key (a vendor's, or tenant@vendor) "=" a value of printable ASCII
# without "," or "=", not ending in a space. A header with any other member, a key twice or
# more than 32 members is dropped whole, as the SDK's propagator drops it, but silently: the
# SDK logs a warning quoting the member, so any caller could write a log line per request.
_MEMBER = re.compile(
    r"([a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
    r"=([\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e])"
)
_MAX_MEMBERS = 32


def parse(traceparent: str | None, tracestate: str | None = None) -> SpanContext:
    """The remote span context in W3C headers (`ROOT` when there is none, or it is invalid)."""
    if not traceparent:
        return ROOT
    found = _TRACEPARENT.fullmatch(traceparent)
    if found is None:
        return ROOT
    version, trace_id, span_id, flags, more = found.groups()
    if version == "ff" or (version == "00" and more):
        return ROOT
    state = _tracestate(tracestate) if tracestate else None
    context = SpanContext(int(trace_id, 16), int(span_id, 16), True, _FLAGS[int(flags, 16)], state)
    return context if context.is_valid else ROOT


def _tracestate(header: str) -> TraceState:
    members: dict[str, str] = {}
    for member in header.split(","):
        member = member.strip(" \t")  # optional whitespace around members (RFC 9110)
        if not member:
            continue
        found = _MEMBER.fullmatch(member)
        if found is None or found[1] in members or len(members) == _MAX_MEMBERS:
            return TraceState()
        members[found[1]] = found[2]
    return TraceState(list(members.items()))


def from_scope(raw: list[tuple[bytes, bytes]]) -> SpanContext:
    """The caller's span context from an ASGI request's raw headers (`ROOT` without), in one
    pass over them. Sent as several fields, tracestate is one list, in their order (W3C trace
    context)."""
    traceparent = None
    tracestate: list[bytes] = []
    for name, value in raw:
        if name == b"traceparent":
            if traceparent is None:
                traceparent = value
        elif name == b"tracestate":
            tracestate.append(value)
    if not traceparent:
        return ROOT
    state = b",".join(tracestate).decode("latin-1") if tracestate else None
    return parse(traceparent.decode("latin-1"), state)


def _traceparent(trace_id: int, span_id: int, flags: int) -> str:
    # %-formatting: twice as fast as an f-string's format specs here (on every traced request).
    return "00-%032x-%016x-%02x" % (trace_id, span_id, flags)  # noqa: UP031


def kept(trace_id: int, span_id: int, flags: int, state: TraceState | None) -> str:
    """A valid span context, given by its parts, as text to store with a job."""
    if state:
        return f"{_traceparent(trace_id, span_id, flags)}\n{state.to_header()}"
    return _traceparent(trace_id, span_id, flags)


def keep(span: Span | None = None) -> str | None:
    """`span`'s context (default: the current span's) as text to store with a job; None when
    there is none to keep. (The relay's tracer reads its own spans' parts: `Tracer.keep`.)"""
    span = span if span is not None else current_span()
    context = span.get_span_context()
    if not context.is_valid:
        return None
    return kept(context.trace_id, context.span_id, context.trace_flags, context.trace_state)


# A job's kept context is read for each of its spans (its page's link, its end, each attempt),
# often by one worker in a row: read once, for the last few thousand jobs.
@functools.lru_cache(maxsize=4096)
def restore(kept: str | None) -> SpanContext | None:
    """The context `keep` wrote (None when the job has none, or it is unreadable)."""
    if not kept:
        return None
    traceparent, _, tracestate = kept.partition("\n")
    context = parse(traceparent, tracestate)
    return context if context.is_valid else None


def link_to(kept: str | None) -> SpanContext | None:
    """The span context of a kept job context, to link a span to (None without one)."""
    return restore(kept)


def headers(span: Span) -> dict[str, str]:
    """The W3C headers that continue `span`'s trace in the request it makes. (The relay's
    tracer reads its own spans' parts: `Tracer.headers`.)"""
    context = span.get_span_context()
    if not context.is_valid:
        return {}
    return carried(context.trace_id, context.span_id, context.trace_flags, context.trace_state)


def carried(trace_id: int, span_id: int, flags: int, state: TraceState | None) -> dict[str, str]:
    """The W3C headers of a valid span context, given by its parts."""
    written = {"traceparent": _traceparent(trace_id, span_id, flags)}
    if state:
        written["tracestate"] = state.to_header()
    return written


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
