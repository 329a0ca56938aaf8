"""The relay's tracer: spans sampled, named and exported as the SDK's tracer would, each a plain
record from its start to the exporter.

The SDK's `Span` guards each span with locks, checks every attribute and copies itself into a
`ReadableSpan` when it ends; its tracer asks the sampler through an OpenTelemetry `Context`
built for the call. On the API's submission path (two spans a request, a thousand requests a
second) that was most of what tracing cost (bench/README.md). The relay's spans are its own,
few and typed: a `Span` here *is* the `ReadableSpan` the batch processor (relay.tracing.batch)
queues and the exporter reads, it keeps its ids as plain fields (the `SpanContext` is made only
when something asks), and the default samplers and id generator are applied inline. What
decides and carries the trace stays the SDK's: the sampler (`OTEL_TRACES_SAMPLER`: any other
than the default's two is asked as the SDK asks it), the id generator (any other than the
default's is asked), the resource and the OTLP client; a `Span` here is current, parent and
link through the OpenTelemetry API like any other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from random import getrandbits
from time import time_ns

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor, TracerProvider, sampling
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.util import types

from relay.tracing.spans import carried, current_span, headers, keep, kept

SCOPE = InstrumentationScope("relay")
UNSET = Status(StatusCode.UNSET)  # a span's status until one is set
_SAMPLED = TraceFlags.SAMPLED
_RANDOM = TraceFlags.RANDOM_TRACE_ID
# A span's flags (sampled, random trace id, neither or both) by their value: made once, not
# per span.
_FLAGS = [TraceFlags(value) for value in range(_SAMPLED + _RANDOM + 1)]


class Tracer:
    def __init__(self, provider: TracerProvider, processor: SpanProcessor) -> None:
        self.sampler = provider.sampler
        self.ids = provider.id_generator
        self.resource = provider.resource
        self.processor = processor
        # The default sampler (`parentbased_always_on`, or unset) and `always_on` decide
        # without being asked: sampled unless a parent says not, the parent's trace state
        # kept (what they answer; asking costs more than the rest of a span).
        self._by_parent = self.sampler is sampling.DEFAULT_ON
        self._inline = self._by_parent or self.sampler is sampling.ALWAYS_ON
        # The default id generator's span ids, drawn here as it draws them.
        self._getrandbits = getrandbits if type(self.ids) is RandomIdGenerator else None

    def start_span(
        self,
        name: str,
        context: SpanContext | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, types.AttributeValue] | None = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
    ) -> trace.Span:
        """A span whose parent is the span of `context` (default: the current span; an invalid
        context, such as `spans.ROOT`, for none): in the parent's trace or a new one, as the
        sampler decides."""
        parent: SpanContext | Span | None
        if context is None:
            # A relay span is read as it is: its context is made only if something asks.
            current = current_span()
            parent = current if type(current) is Span else current.get_span_context()
        else:
            parent = context
        # isinstance of SpanContext, a plain class: of Span, an ABC's, costs a call when false.
        if not isinstance(parent, SpanContext):
            trace_id, flags, state = parent._trace_id, parent._flags, parent._state
        elif parent.is_valid:
            trace_id, flags, state = parent.trace_id, parent.trace_flags, parent.trace_state
        else:
            parent, state, flags = None, None, None
            trace_id = self.ids.generate_trace_id()
        if flags is not None:
            random = flags & _RANDOM
        else:
            random = _RANDOM if self.ids.is_trace_id_random() else 0
        if self._inline:
            sampled = flags is None or not self._by_parent or flags & _SAMPLED
            recorded = sampled
        else:
            asked = self.sampler.should_sample(
                _as_context(parent), trace_id, name, kind, attributes, links
            )
            sampled = asked.decision is sampling.Decision.RECORD_AND_SAMPLE
            recorded = asked.decision is not sampling.Decision.DROP
            state, attributes = asked.trace_state, asked.attributes
        span_id = (self._getrandbits(64) if self._getrandbits else 0) or (
            self.ids.generate_span_id()  # another id generator's, or a random 0 (invalid)
        )
        flags = _FLAGS[random | _SAMPLED if sampled else random]
        if not recorded:
            return trace.NonRecordingSpan(SpanContext(trace_id, span_id, False, flags, state))
        return Span(
            self,
            name,
            trace_id,
            span_id,
            flags,
            state or None,
            parent,
            kind,
            dict(attributes) if attributes else {},
            list(links) if links else None,
            start_time or time_ns(),
        )

    def keep(self) -> str | None:
        """The current span's context as text to store with a job, as `spans.keep` writes it:
        a relay span's from its own fields, without making its `SpanContext`."""
        span = current_span()
        if type(span) is Span:
            return kept(span._trace_id, span._span_id, span._flags, span._state)
        return keep(span)

    def headers(self, span: trace.Span) -> dict[str, str]:
        """The W3C headers that continue `span`'s trace, as `spans.headers` writes them: a
        relay span's from its own fields, without making its `SpanContext`."""
        if type(span) is Span:
            return carried(span._trace_id, span._span_id, span._flags, span._state)
        return headers(span)


def _as_context(parent: SpanContext | Span | None) -> Context:
    """`start_span`'s parent as a sampler is asked about it (the submission's span, which
    OpenTelemetry's context does not hold, included)."""
    if parent is None:
        return Context()
    context = parent if isinstance(parent, SpanContext) else parent.get_span_context()
    return trace.set_span_in_context(trace.NonRecordingSpan(context), Context())


class Span(trace.Span, ReadableSpan):
    """A recording span of the relay's, and the record the exporter reads once it ended.

    Its ids are plain fields: the `SpanContext` the OpenTelemetry API speaks is made the first
    time something asks for it (a span made a thousand times a second, whose context the
    relay's own code reads from the fields, mostly never is)."""

    _attributes: dict[str, types.AttributeValue]
    # Fields most spans keep as they start, held by the class until one changes (fewer
    # stores for each of the thousand spans a second the API makes).
    _links: Sequence[Link] = ()
    _events: Sequence[Event] = ()
    _status = UNSET
    _end_time: int | None = None
    _instrumentation_scope = SCOPE
    _instrumentation_info = None
    _span_context: SpanContext | None = None

    def __init__(
        self,
        tracer: Tracer,
        name: str,
        trace_id: int,
        span_id: int,
        flags: TraceFlags,
        state: TraceState | None,
        parent: SpanContext | Span | None,
        kind: SpanKind,
        attributes: dict[str, types.AttributeValue],
        links: list[Link] | None,
        start_time: int,
    ) -> None:
        # ReadableSpan's fields, by its names (its properties read them), but for the context
        # and the parent's, which are read through properties of their own.
        self._tracer = tracer
        self._name = name
        self._trace_id = trace_id
        self._span_id = span_id
        self._flags = flags
        self._state = state
        self._parent_span = parent
        self._kind = kind
        self._attributes = attributes
        if links:
            self._links = links
        self._start_time = start_time
        self._resource = tracer.resource

    # What the exporter reads, without the copies ReadableSpan makes (an ended span is not
    # changed) and with no limits to count drops by (the relay's spans are few and small).
    @property
    def context(self) -> SpanContext:
        return self.get_span_context()

    @property
    def parent(self) -> SpanContext | None:
        parent = self._parent_span
        return (
            parent
            if parent is None or isinstance(parent, SpanContext)
            else parent.get_span_context()
        )

    @property
    def attributes(self) -> Mapping[str, types.AttributeValue]:
        return self._attributes

    @property
    def events(self) -> Sequence[Event]:
        return self._events

    @property
    def links(self) -> Sequence[Link]:
        return self._links

    @property
    def dropped_attributes(self) -> int:
        return 0

    @property
    def dropped_events(self) -> int:
        return 0

    @property
    def dropped_links(self) -> int:
        return 0

    def get_span_context(self) -> SpanContext:
        context = self._span_context
        if context is None:
            context = self._span_context = SpanContext(
                self._trace_id, self._span_id, False, self._flags, self._state
            )
        return context

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attributes(self, attributes: Mapping[str, types.AttributeValue]) -> None:
        if self._end_time is None:
            for key, value in attributes.items():
                self.set_attribute(key, value)

    def set_attribute(self, key: str, value: types.AttributeValue) -> None:
        if self._end_time is None and value is not None:
            self._attributes[key] = value

    def add_event(
        self, name: str, attributes: types.Attributes = None, timestamp: int | None = None
    ) -> None:
        if self._end_time is None:
            event = Event(name, attributes, timestamp)
            if isinstance(self._events, list):
                self._events.append(event)
            else:
                self._events = [event]

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        if self._end_time is None and context.is_valid:
            link = Link(context, attributes)
            if isinstance(self._links, list):
                self._links.append(link)
            else:
                self._links = [link]

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # The SDK's rules: UNSET changes nothing, and OK is final.
        if not isinstance(status, Status):
            status = Status(status, description)
        if (
            self._end_time is None
            and status.status_code is not StatusCode.UNSET
            and self._status.status_code is not StatusCode.OK
        ):
            self._status = status

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        # The type only: an exception's message may quote what a caller sent.
        self.add_event("exception", {"exception.type": type(exception).__qualname__}, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            return
        self._end_time = end_time or time_ns()
        if self._flags & _SAMPLED:  # a span only recorded is not exported
            # Queued as it is, exported from the processor's thread.
            self._tracer.processor.on_end(self)
