"""OTLP/HTTP export of spans, with the protobuf written directly.

The exporter is the SDK's own (`OTLPSpanExporter`: endpoint, headers, TLS, compression and
retries from the `OTEL_EXPORTER_OTLP_*` variables); only the encoding is replaced. The
official encoder builds a protobuf object per span, attribute and value, which costs more
than making the span did (about 65 µs a span here, bench/README.md): in the API process, at
a thousand submissions a second, that alone was a sixth of a core. `encode_spans` writes the
same `ExportTraceServiceRequest` straight to bytes, field for field as the official encoder
sets them (tests/test_tracing.py decodes both and compares).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext

log = logging.getLogger(__name__)

_FIXED64 = struct.Struct("<Q").pack
_FIXED32 = struct.Struct("<I").pack
_DOUBLE = struct.Struct("<d").pack
# SpanFlags: the span's context says whether its parent (or a link's target) is remote.
_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200


def _varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field (`tag` already encoded)."""
    return tag + _varint(len(payload)) + payload


def _text(tag: bytes, text: str) -> bytes:
    return _field(tag, text.encode())


def _value(value: Any) -> bytes:
    """An AnyValue (its oneof always set, as the official encoder sets it)."""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _text(b"\x0a", value)
    if isinstance(value, int):
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)  # int64: two's complement
    if isinstance(value, float):
        return b"\x21" + _DOUBLE(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if isinstance(value, Mapping):
        pairs = b"".join(_field(b"\x0a", _key_value(str(k), v)) for k, v in value.items())
        return _field(b"\x32", pairs)
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join(_field(b"\x0a", _value(item)) for item in value))
    return b""  # None: an empty AnyValue


def _key_value(key: str, value: Any) -> bytes:
    return _text(b"\x0a", key) + _field(b"\x12", _value(value))


# Encoded attributes by (key, value): most repeat on every span (a method, a route, a host, a
# status code). Ids are unique and not kept; the rest is bounded by clearing it when full.
# Keyed by the value's type too: True == 1, and they encode differently.
_SEEN: dict[tuple[str, type, object], bytes] = {}
_SEEN_MAX = 4096


def _pair(key: str, value: Any) -> bytes:
    if key.endswith(".id") or not isinstance(value, str | int):
        return _key_value(key, value)
    seen = (key, type(value), value)
    found = _SEEN.get(seen)
    if found is None:
        if len(_SEEN) >= _SEEN_MAX:
            _SEEN.clear()
        found = _SEEN[seen] = _key_value(key, value)
    return found


def _attributes(tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
    if not attributes:
        return b""
    return b"".join(_field(tag, _pair(key, value)) for key, value in attributes.items())


def _flags(context: SpanContext | None) -> int:
    return _HAS_IS_REMOTE | (_IS_REMOTE if context is not None and context.is_remote else 0)


def _span(span: ReadableSpan) -> bytes:
    context = span.get_span_context()
    assert context is not None
    parts = [
        b"\x0a\x10" + context.trace_id.to_bytes(16, "big"),
        b"\x12\x08" + context.span_id.to_bytes(8, "big"),
    ]
    if context.trace_state:
        state = ",".join(f"{key}={value}" for key, value in context.trace_state.items())
        parts.append(_text(b"\x1a", state))
    if span.parent is not None:
        parts.append(b"\x22\x08" + span.parent.span_id.to_bytes(8, "big"))
    if span.name:
        parts.append(_text(b"\x2a", span.name))
    parts.append(b"\x30" + _varint(span.kind.value + 1))  # the SDK's kinds start at 0
    if span.start_time:
        parts.append(b"\x39" + _FIXED64(span.start_time))
    if span.end_time:
        parts.append(b"\x41" + _FIXED64(span.end_time))
    parts.append(_attributes(b"\x4a", span.attributes))
    if span.dropped_attributes:
        parts.append(b"\x50" + _varint(span.dropped_attributes))
    for event in span.events:
        encoded = b"\x09" + _FIXED64(event.timestamp) + _text(b"\x12", event.name)
        encoded += _attributes(b"\x1a", event.attributes)
        if event.dropped_attributes:
            encoded += b"\x20" + _varint(event.dropped_attributes)
        parts.append(_field(b"\x5a", encoded))
    if span.dropped_events:
        parts.append(b"\x60" + _varint(span.dropped_events))
    for link in span.links:
        encoded = b"\x0a\x10" + link.context.trace_id.to_bytes(16, "big")
        encoded += b"\x12\x08" + link.context.span_id.to_bytes(8, "big")
        encoded += _attributes(b"\x22", link.attributes)
        if link.dropped_attributes:
            encoded += b"\x28" + _varint(link.dropped_attributes)
        encoded += b"\x35" + _FIXED32(_flags(link.context))
        parts.append(_field(b"\x6a", encoded))
    if span.dropped_links:
        parts.append(b"\x70" + _varint(span.dropped_links))
    status = span.status
    encoded = b""
    if status.description:
        encoded += _text(b"\x12", status.description)
    if status.status_code.value:
        encoded += b"\x18" + _varint(status.status_code.value)
    parts.append(_field(b"\x7a", encoded))
    parts.append(b"\x85\x01" + _FIXED32(_flags(span.parent)))
    return b"".join(parts)


def _scope(scope: InstrumentationScope | None) -> bytes:
    if scope is None:
        return b""
    encoded = _text(b"\x0a", scope.name) if scope.name else b""
    if scope.version:
        encoded += _text(b"\x12", scope.version)
    return encoded + _attributes(b"\x1a", scope.attributes)


def encode_spans(spans: Sequence[ReadableSpan]) -> bytes:
    """An ExportTraceServiceRequest of `spans`, grouped by resource, then scope."""
    grouped: dict[int, tuple[Resource, dict[int, tuple[InstrumentationScope | None, list[bytes]]]]]
    grouped = {}
    for span in spans:
        # By identity: a process has one resource and one scope (hashing a Resource
        # serialises its attributes every time).
        resource, scope = span.resource, span.instrumentation_scope
        scopes = grouped.setdefault(id(resource), (resource, {}))[1]
        scopes.setdefault(id(scope), (scope, []))[1].append(_field(b"\x12", _span(span)))
    out = []
    for resource, scopes in grouped.values():
        encoded = _field(b"\x0a", _attributes(b"\x0a", resource.attributes))
        for scope, encoded_spans in scopes.values():
            scope_spans = _field(b"\x0a", _scope(scope)) + b"".join(encoded_spans)
            if scope is not None and scope.schema_url:
                scope_spans += _text(b"\x1a", scope.schema_url)
            encoded += _field(b"\x12", scope_spans)
        if resource.schema_url:
            encoded += _text(b"\x1a", resource.schema_url)
        out.append(_field(b"\x0a", encoded))
    return b"".join(out)


class SpanExporter(OTLPSpanExporter):
    """The SDK's OTLP/HTTP exporter with `encode_spans` as its encoder."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._shutdown:
            return SpanExportResult.FAILURE
        try:
            data = encode_spans(spans)
        except Exception:
            log.exception("a batch of spans could not be encoded")
            return SpanExportResult.FAILURE
        # The SDK's client: endpoint, headers, compression, timeout and retries.
        result = self._client.export(data)
        return SpanExportResult.SUCCESS if result.success else SpanExportResult.FAILURE
