"""A real OTLP/HTTP trace receiver for the tests: it decodes each export with the OpenTelemetry
protobuf definitions (`opentelemetry-proto`) and keeps every span it got."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def value(any_value: AnyValue) -> object:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def attributes(pairs: Iterable[KeyValue]) -> dict[str, object]:
    return {pair.key: value(pair.value) for pair in pairs}


@dataclass(frozen=True)
class Received:
    """One span as exported, with the attributes of the process (resource) that sent it."""

    span: Span
    resource: dict[str, object]

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_id(self) -> str:
        return self.span.parent_span_id.hex()

    @property
    def attributes(self) -> dict[str, object]:
        return attributes(self.span.attributes)

    @property
    def links(self) -> list[tuple[str, str]]:
        """(trace id, span id) of each link."""
        return [(link.trace_id.hex(), link.span_id.hex()) for link in self.span.links]


@dataclass
class OtlpReceiver:
    spans: list[Received] = field(default_factory=list)
    content_types: set[str] = field(default_factory=set)
    batches: list[int] = field(default_factory=list)  # the spans in each export, in order
    delay: float = 0.0  # how long each export waits for its answer (a slow collector)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> Starlette:
        async def traces(request: Request) -> Response:
            export = ExportTraceServiceRequest.FromString(await request.body())
            await asyncio.sleep(self.delay)
            got = [
                Received(span, attributes(resource_spans.resource.attributes))
                for resource_spans in export.resource_spans
                for scope_spans in resource_spans.scope_spans
                for span in scope_spans.spans
            ]
            with self.lock:
                self.content_types.add(request.headers.get("content-type", ""))
                self.spans.extend(got)
                self.batches.append(len(got))
            return Response(
                ExportTraceServiceResponse().SerializeToString(),
                media_type="application/x-protobuf",
            )

        return Starlette(routes=[Route("/v1/traces", traces, methods=["POST"])])

    def in_trace(self, trace_id: str) -> list[Received]:
        with self.lock:
            return [span for span in self.spans if span.trace_id == trace_id]

    def all(self) -> list[Received]:
        with self.lock:
            return list(self.spans)


@contextlib.contextmanager
def stalled_collector() -> Iterator[str]:
    """The endpoint of a collector that takes connections and never answers (the kernel
    accepts them into the backlog; nothing reads): every export waits for its timeout."""
    with socket.create_server(("127.0.0.1", 0), backlog=64) as listening:
        yield f"http://127.0.0.1:{listening.getsockname()[1]}"
