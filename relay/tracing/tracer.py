"""The relay's tracer: spans sampled, named and exported by the SDK's own parts, kept as plain
records while they run.

The SDK's `Span` guards each span with locks, checks every attribute and copies itself into a
`ReadableSpan` when it ends; on the API's submission path (two spans a request, a thousand
requests a second) that cost as much as the rest of the tracing together (bench/README.md).
The relay's spans are its own, few and typed, so a `Span` here keeps its fields in a dict and
a list, and hands one `ReadableSpan` to the SDK's batch processor at its end. What decides and
carries the trace stays the SDK's and the API's: the sampler (`OTEL_TRACES_SAMPLER`), the id
generator, the resource, the batch processor and the OTLP exporter; contexts and W3C headers
through the API, so a `Span` here is current, parent and link like any other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from time import time_ns

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util import types

SCOPE = InstrumentationScope("relay")


class Tracer:
    def __init__(self, provider: TracerProvider, processor: SpanProcessor) -> None:
        self.sampler = provider.sampler
        self.ids = provider.id_generator
        self.resource = provider.resource
        self.processor = processor

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, types.AttributeValue] | None = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
    ) -> trace.Span:
        """A span under `context`'s span (default: the current one), as the SDK's tracer starts
        one: the parent's trace or a new one, the sampler's decision and trace state."""
        parent: SpanContext | None = trace.get_current_span(context).get_span_context()
        if parent is not None and parent.is_valid:
            trace_id, random = parent.trace_id, parent.trace_flags.random_trace_id
        else:
            parent = None
            trace_id, random = self.ids.generate_trace_id(), self.ids.is_trace_id_random()
        sampled = self.sampler.should_sample(context, trace_id, name, kind, attributes, links)
        decision = sampled.decision
        flags = TraceFlags.SAMPLED if decision is Decision.RECORD_AND_SAMPLE else TraceFlags.DEFAULT
        if random:
            flags |= TraceFlags.RANDOM_TRACE_ID
        span_context = SpanContext(
            trace_id,
            self.ids.generate_span_id(),
            is_remote=False,
            trace_flags=TraceFlags(flags),
            trace_state=sampled.trace_state,
        )
        if decision is Decision.DROP:
            return trace.NonRecordingSpan(span_context)
        return Span(
            self,
            name,
            span_context,
            parent,
            kind,
            dict(sampled.attributes),
            list(links or ()),
            start_time or time_ns(),
        )


class Span(trace.Span):
    """A recording span of the relay's: a record until `end` hands it to the exporter."""

    def __init__(
        self,
        tracer: Tracer,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, types.AttributeValue],
        links: list[Link],
        start_time: int,
    ) -> None:
        self._tracer = tracer
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        self._attributes = attributes
        self._links = links
        self._events: list[Event] = []
        self._status = Status(StatusCode.UNSET)
        self._start = start_time
        self._end: int | None = None

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self._end is None

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        if self._end is None:
            for key, value in attributes.items():
                self.set_attribute(key, value)

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        if self._end is None and value is not None:
            self._attributes[key] = value

    def add_event(
        self, name: str, attributes: types.Attributes = None, timestamp: int | None = None
    ) -> None:
        if self._end is None:
            self._events.append(Event(name, attributes, timestamp))

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        if self._end is None and context.is_valid:
            self._links.append(Link(context, attributes))

    def update_name(self, name: str) -> None:
        if self._end is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # The SDK's rules: UNSET changes nothing, and OK is final.
        if not isinstance(status, Status):
            status = Status(status, description)
        if (
            self._end is None
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
        if self._end is not None:
            return
        self._end = end_time or time_ns()
        tracer = self._tracer
        tracer.processor.on_end(
            ReadableSpan(
                self._name,
                context=self._context,
                parent=self._parent,
                resource=tracer.resource,
                attributes=self._attributes,
                events=self._events,
                links=self._links,
                kind=self._kind,
                status=self._status,
                start_time=self._start,
                end_time=self._end,
                instrumentation_scope=SCOPE,
            )
        )
