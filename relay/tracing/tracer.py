"""The relay's tracer: spans sampled, named and exported as the SDK's tracer would, each a plain
record from its start to the exporter.

The SDK's `Span` guards each span with locks, checks every attribute and copies itself into a
`ReadableSpan` when it ends; its tracer asks the sampler through an OpenTelemetry `Context`
built for the call. On the API's submission path (two spans a request, a thousand requests a
second) that was most of what tracing cost (bench/README.md). The relay's spans are its own,
few and typed: a `Span` here *is* the `ReadableSpan` the batch processor queues and the
exporter reads, and the default samplers are decided inline. What decides and carries the trace
stays the SDK's: the sampler (`OTEL_TRACES_SAMPLER`: any other than the default's two is asked
as the SDK asks it), the id generator, the resource, the batch processor (`OTEL_BSP_*`) and
the OTLP exporter; a `Span` here is current, parent and link through the OpenTelemetry API
like any other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from time import time_ns

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor, TracerProvider, sampling
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util import types

from relay.tracing.spans import current_span

SCOPE = InstrumentationScope("relay")
UNSET = Status(StatusCode.UNSET)  # a span's status until one is set
# A span's flags by (sampled, random trace id): made once, not per span.
_FLAGS = {
    (sampled, random): TraceFlags(
        (TraceFlags.SAMPLED if sampled else 0) | (TraceFlags.RANDOM_TRACE_ID if random else 0)
    )
    for sampled in (False, True)
    for random in (False, True)
}


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
        if context is None:
            context = current_span().get_span_context()
        parent: SpanContext | None = context
        if context.is_valid:
            trace_id, random = context.trace_id, context.trace_flags.random_trace_id
            state = context.trace_state
        else:
            parent, state = None, None
            trace_id, random = self.ids.generate_trace_id(), self.ids.is_trace_id_random()
        if self._inline:
            sampled = parent is None or not self._by_parent or parent.trace_flags.sampled
            recorded = sampled
        else:
            asked = self.sampler.should_sample(
                _as_context(context), trace_id, name, kind, attributes, links
            )
            sampled = asked.decision is sampling.Decision.RECORD_AND_SAMPLE
            recorded = asked.decision is not sampling.Decision.DROP
            state, attributes = asked.trace_state, asked.attributes
        span_context = SpanContext(
            trace_id, self.ids.generate_span_id(), False, _FLAGS[sampled, random], state
        )
        if not recorded:
            return trace.NonRecordingSpan(span_context)
        return Span(
            self,
            name,
            span_context,
            parent,
            kind,
            dict(attributes) if attributes else {},
            list(links) if links else None,
            start_time or time_ns(),
        )


def _as_context(context: SpanContext) -> Context:
    """`start_span`'s parent as a sampler is asked about it (the submission's span, which
    OpenTelemetry's context does not hold, included)."""
    return trace.set_span_in_context(trace.NonRecordingSpan(context), Context())


class Span(trace.Span, ReadableSpan):
    """A recording span of the relay's, and the record the exporter reads once it ended."""

    _context: SpanContext
    _attributes: dict[str, types.AttributeValue]
    # Fields most spans keep as they start, held by the class until one changes (fewer
    # stores for each of the thousand spans a second the API makes).
    _links: Sequence[Link] = ()
    _events: Sequence[Event] = ()
    _status = UNSET
    _end_time: int | None = None
    _instrumentation_scope = SCOPE
    _instrumentation_info = None

    def __init__(
        self,
        tracer: Tracer,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, types.AttributeValue],
        links: list[Link] | None,
        start_time: int,
    ) -> None:
        # ReadableSpan's fields, by its names (its properties read them).
        self._tracer = tracer
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        self._attributes = attributes
        if links:
            self._links = links
        self._start_time = start_time
        self._resource = tracer.resource

    # What the exporter reads, without the copies ReadableSpan makes (an ended span is not
    # changed) and with no limits to count drops by (the relay's spans are few and small).
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
        return self._context

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
        # Queued as it is (the processor keeps the sampled ones), exported from its thread.
        self._tracer.processor.on_end(self)
