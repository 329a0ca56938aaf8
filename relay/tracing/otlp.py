"""OTLP/HTTP export of spans, with the protobuf written directly.

The official exporter (`OTLPSpanExporter`) builds a protobuf object per span, attribute and
value, which costs more than making the span did (about 65 µs a span here, bench/README.md):
in the API process, at a thousand submissions a second, that alone was a sixth of a core.
`encode_spans` writes the same `ExportTraceServiceRequest` straight to bytes, field for field
as the official encoder sets them (tests/test_tracing.py decodes both and compares).

What sends them is the SDK's: its OTLP/HTTP client (retries, back-off, compression) over its
urllib3 transport, set up from the `OTEL_EXPORTER_OTLP_*` variables by the SDK's own readers.
Not the official exporter's requests session: in the API a POST through requests cost three
times what urllib3's does (its session's environment, netrc and certificate look-ups each
time), and the official exporter's module loads protobuf and requests (about 7,000 objects
more, which every full collection of the API's heap goes through again).
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.exporter.http.transport._base import BaseHTTPTransport
from opentelemetry.exporter.http.transport._requests import RequestsHTTPTransport
from opentelemetry.exporter.http.transport._urllib3 import Urllib3HTTPTransport
from opentelemetry.exporter.otlp.common.http import _OTLPHTTPClient
from opentelemetry.exporter.otlp.proto.http._common import (
    _load_session_from_envvar,
    _resolve_compression,
    _resolve_endpoint,
    _resolve_headers,
    _resolve_timeout,
)
from opentelemetry.sdk.environment_variables import (
    OTEL_EXPORTER_OTLP_CERTIFICATE,
    OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE,
    OTEL_EXPORTER_OTLP_CLIENT_KEY,
    OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE,
    OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE,
    OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY,
    OTEL_EXPORTER_OTLP_TRACES_COMPRESSION,
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
    OTEL_EXPORTER_OTLP_TRACES_HEADERS,
    OTEL_EXPORTER_OTLP_TRACES_TIMEOUT,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter as BaseSpanExporter
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, Status, StatusCode

from relay.tracing.tracer import UNSET, Span

log = logging.getLogger(__name__)
# The client logs its failed exports and retries here, as the official exporter's does
# (relay.tracing.setup quietens it).
CLIENT_LOGGER = "opentelemetry.exporter.otlp.proto.http.trace_exporter"

_FIXED64 = struct.Struct("<Q").pack
_FIXED32 = struct.Struct("<I").pack
_DOUBLE = struct.Struct("<d").pack
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
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
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ValueError("an int past int64")
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
    if value is None:
        return b""  # an empty AnyValue
    raise TypeError(f"no AnyValue holds a {type(value).__name__}")


def _key_value(key: str, value: Any) -> bytes:
    return _text(b"\x0a", key) + _field(b"\x12", _value(value))


# Encoded attribute fields by (tag, key, value): most repeat on every span (a method, a route,
# a host, a status code). Ids are unique and not kept; the rest is bounded by clearing it when
# full. Keyed by the value's type too: True == 1, and they encode differently.
_SEEN: dict[tuple[bytes, str, type, object], bytes] = {}
_SEEN_MAX = 4096
_KEPT = (str, int)


def _attributes(tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
    if not attributes:
        return b""
    encoded = []
    for key, value in attributes.items():
        if isinstance(value, _KEPT) and not key.endswith(".id"):
            seen = (tag, key, type(value), value)
            found = _SEEN.get(seen)
            if found is None:
                if len(_SEEN) >= _SEEN_MAX:
                    _SEEN.clear()
                found = _SEEN[seen] = _attribute(tag, key, value)
            encoded.append(found)
        else:
            encoded.append(_attribute(tag, key, value))
    return b"".join(encoded)


# A KeyValue's key field by the key (a handful of keys).
_KEYS: dict[str, bytes] = {}


def _attribute(tag: bytes, key: str, value: Any) -> bytes:
    """One attribute, as a field `tag` of a KeyValue; nothing for a value no AnyValue holds,
    which the official encoder leaves out too (it logs each one: here that would be a line for
    every span that has it)."""
    # A short text (a job's id, what is least often cached): written with one-byte lengths.
    if type(value) is str and len(value) < 100:
        named = _KEYS.get(key)
        if named is None:
            if len(_KEYS) >= _SEEN_MAX:
                _KEYS.clear()
            named = _KEYS[key] = _text(b"\x0a", key)
        text = value.encode()
        size = len(text)
        pair = len(named) + size + 4  # the key, then the value's tag, length, tag, length
        if pair < 0x80 and size < 0x80:
            return b"".join(
                (tag, _BYTES[pair], named, b"\x12", _BYTES[size + 2], b"\x0a", _BYTES[size], text)
            )
    try:
        return _field(tag, _key_value(key, value))
    except (TypeError, ValueError):
        return b""


_BYTES = [bytes((n,)) for n in range(0x82)]


# Whether a span's parent (or a link's target) is remote: the span's field 16, a link's 6.
_SPAN_FLAGS = {
    False: b"\x85\x01" + _FIXED32(_HAS_IS_REMOTE),
    True: b"\x85\x01" + _FIXED32(_HAS_IS_REMOTE | _IS_REMOTE),
}
_UNSET = _field(b"\x7a", b"")  # a span's status when it has none
# A span's name and kind fields, by both: a handful of pairs.
_NAMES: dict[tuple[str, int], bytes] = {}


def _status(status: Status) -> bytes:
    if status.status_code is StatusCode.UNSET and not status.description:
        return _UNSET
    encoded = _text(b"\x12", status.description) if status.description else b""
    if status.status_code is not StatusCode.UNSET:
        encoded += b"\x18" + _varint(status.status_code.value)
    return _field(b"\x7a", encoded)


def _link(link: Link) -> bytes:
    context = link.context
    trace_id = context.trace_id
    encoded = _IDS(b"\x0a\x10", trace_id >> 64, trace_id & _LOW, b"\x12\x08", context.span_id)
    encoded += _attributes(b"\x22", link.attributes)
    if link.dropped_attributes:
        encoded += b"\x28" + _varint(link.dropped_attributes)
    encoded += b"\x35" + _FIXED32(_HAS_IS_REMOTE | (_IS_REMOTE if context.is_remote else 0))
    return _field(b"\x6a", encoded)


def _event(event: Event) -> bytes:
    encoded = b"\x09" + _FIXED64(event.timestamp) + _text(b"\x12", event.name)
    encoded += _attributes(b"\x1a", event.attributes)
    if event.dropped_attributes:
        encoded += b"\x20" + _varint(event.dropped_attributes)
    return _field(b"\x5a", encoded)


# A span's ids (trace id in two halves) and times, each field with its tag, packed at once.
_IDS = struct.Struct(">2sQQ2sQ").pack
_PARENT = struct.Struct(">2sQ").pack
_TIMES = struct.Struct("<cQcQ").pack
_LOW = (1 << 64) - 1


def _span(span: ReadableSpan) -> bytes:
    """One span as a ScopeSpans' `spans` field (its tag and length included)."""
    context = span.get_span_context()
    assert context is not None
    parent = span.parent
    trace_id = context.trace_id
    # Fields in the order the official encoder writes them.
    parts = [_IDS(b"\x0a\x10", trace_id >> 64, trace_id & _LOW, b"\x12\x08", context.span_id)]
    if context.trace_state:
        state = ",".join(f"{key}={value}" for key, value in context.trace_state.items())
        parts.append(_text(b"\x1a", state))
    if parent is not None:
        parts.append(_PARENT(b"\x22\x08", parent.span_id))
    kind = span.kind
    named = _NAMES.get((span.name, id(kind)))  # by id: hashing an Enum calls Python code
    if named is None:
        if len(_NAMES) >= _SEEN_MAX:
            _NAMES.clear()
        name = _text(b"\x2a", span.name) if span.name else b""
        named = _NAMES[span.name, id(kind)] = name + b"\x30" + _varint(kind.value + 1)  # from 0
    parts.append(named)
    start, end = span.start_time, span.end_time
    if start and end:
        parts.append(_TIMES(b"\x39", start, b"\x41", end))
    else:
        parts.append(b"\x39" + _FIXED64(start) if start else b"")
        parts.append(b"\x41" + _FIXED64(end) if end else b"")
    parts.append(_attributes(b"\x4a", span.attributes))
    if span.dropped_attributes:
        parts.append(b"\x50" + _varint(span.dropped_attributes))
    events, links = span.events, span.links
    if events:
        parts.extend(_event(event) for event in events)
    if span.dropped_events:
        parts.append(b"\x60" + _varint(span.dropped_events))
    if links:
        parts.extend(_link(link) for link in links)
    if span.dropped_links:
        parts.append(b"\x70" + _varint(span.dropped_links))
    parts.append(_status(span.status))
    parts.append(_SPAN_FLAGS[parent is not None and parent.is_remote])
    return _spans_field(b"".join(parts))


# A `spans` field's tag and length, by the length, for spans under 2,048 bytes (nearly all).
_HEADS = [b"\x12" + _varint(length) for length in range(2048)]


def _spans_field(encoded: bytes) -> bytes:
    length = len(encoded)
    if length < 2048:
        return _HEADS[length] + encoded
    return b"\x12" + _varint(length) + encoded


# What follows a relay span's ids and times (its name and kind; its attributes, status and flags)
# by what they are made of. The submission and its create are made a thousand times a second
# alike but for their ids and times, a job's end and attempts alike but for those and the job's
# id: the ids and times are packed afresh, and so are id attributes (`*.id`, a job's in few
# spans), events and links, in the holes and after the rest, which is found here. Kept for
# spans whose other attributes are str, int or bool.
_TAILS: dict[tuple[object, ...], tuple[bytes, tuple[bytes, ...], bytes]] = {}
_TAIL_TYPES = frozenset((str, int, bool, object))  # object: an id attribute's hole
# Where a span's id attributes sit, by its attributes' names.
_ID_PLACES: dict[tuple[str, ...], tuple[int, ...]] = {}
_HOLE = object()  # an id attribute's value in a `_TAILS` key
_BOTH = struct.Struct(">2sQQ2sQ2sQ").pack  # trace id, span id and parent id
_ROOT_IDS = struct.Struct(">2sQQ2sQ").pack


def _relay_span(span: Span) -> bytes:
    """A relay span as `_span` writes it, what it shares with spans alike from `_TAILS`.
    Repeated fields keep `_span`'s order; some others come later (a decoder takes them in any
    order)."""
    start, end = span._start_time, span._end_time
    if end is None:
        return _span(span)
    attributes = span._attributes
    names = tuple(attributes)
    places = _ID_PLACES.get(names)
    if places is None:
        if len(_ID_PLACES) >= _SEEN_MAX:
            _ID_PLACES.clear()
        places = tuple(n for n, name in enumerate(names) if name.endswith(".id"))
        _ID_PLACES[names] = places
    values = tuple(attributes.values())
    shared: tuple[object, ...] = values
    if places:
        held: list[object] = list(values)
        for n in places:
            held[n] = _HOLE
        shared = tuple(held)
    parent = span._parent_span
    # A relay span's parent is a relay span of this process (never remote), or a context.
    if parent is None:
        parent_id, remote = None, False
    elif isinstance(parent, SpanContext):
        parent_id, remote = parent.span_id, parent.is_remote
    else:
        parent_id, remote = parent._span_id, False
    status = span._status
    types = tuple(map(type, shared))
    key = (
        span._name,
        id(span._kind),  # by id: hashing an Enum calls Python code
        names,
        shared,
        types,  # True == 1, and they encode differently
        status if status is UNSET else (id(status.status_code), status.description),
        remote,
    )
    try:
        tail = _TAILS.get(key)
    except TypeError:  # a value no hash takes
        return _span(span)
    if tail is None:
        tail = _tail(span, places, remote)
        if _TAIL_TYPES.issuperset(types):
            if len(_TAILS) >= _SEEN_MAX:
                _TAILS.clear()
            _TAILS[key] = tail
    trace_id = span._trace_id
    if parent_id is None:
        ids = _ROOT_IDS(b"\x0a\x10", trace_id >> 64, trace_id & _LOW, b"\x12\x08", span._span_id)
    else:
        ids = _BOTH(
            *(b"\x0a\x10", trace_id >> 64, trace_id & _LOW),
            *(b"\x12\x08", span._span_id, b"\x22\x08", parent_id),
        )
    state = span._state
    if state:
        # Its field (3) after the parent's (4): a decoder takes fields in any order.
        ids += _text(b"\x1a", ",".join(f"{name}={value}" for name, value in state.items()))
    segments = tail[1]
    times = _TIMES(b"\x39", start, b"\x41", end)
    if not places and not span._events and not span._links:  # the submission's two spans
        return _spans_field(b"".join((ids, tail[0], times, segments[0], tail[2])))
    parts = [ids, tail[0], times, segments[0]]
    for n, segment in zip(places, segments[1:], strict=True):
        parts.append(_attribute(b"\x4a", names[n], values[n]))
        parts.append(segment)
    parts.append(tail[2])
    if span._events:
        parts.extend(_event(event) for event in span._events)
    if span._links:
        parts.extend(_link(link) for link in span._links)
    return _spans_field(b"".join(parts))


def _tail(
    span: Span, places: tuple[int, ...], remote: bool
) -> tuple[bytes, tuple[bytes, ...], bytes]:
    """A span's name and kind; its attributes but those at `places`, as the segments between
    them; its status and flags (`remote`: whether its parent is)."""
    kind = span._kind
    name = _text(b"\x2a", span._name) if span._name else b""
    segments = []
    segment = b""
    for n, item in enumerate(span._attributes.items()):
        if n in places:
            segments.append(segment)
            segment = b""
        else:
            segment += _attributes(b"\x4a", dict((item,)))
    segments.append(segment)
    return (
        name + b"\x30" + _varint(kind.value + 1),
        tuple(segments),
        _status(span._status) + _SPAN_FLAGS[remote],
    )


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
    last: tuple[Resource | None, InstrumentationScope | None, list[bytes]] = (None, None, [])
    resource: Resource
    scope: InstrumentationScope | None
    for span in spans:
        # By identity: a process has one resource and one scope (hashing a Resource
        # serialises its attributes every time), so most spans share the last one's.
        if type(span) is Span:
            resource, scope = span._resource, span._instrumentation_scope
            one = _relay_span(span)
        else:
            resource, scope = span.resource, span.instrumentation_scope
            one = _span(span)
        if resource is not last[0] or scope is not last[1]:
            scopes = grouped.setdefault(id(resource), (resource, {}))[1]
            last = (resource, scope, scopes.setdefault(id(scope), (scope, []))[1])
        last[2].append(one)
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


class SpanExporter(BaseSpanExporter):
    """OTLP/HTTP to the collector the `OTEL_EXPORTER_OTLP_*` variables name (the official
    exporter's defaults and readers: endpoint, headers, timeout, compression, certificates),
    with `encode_spans` as its encoder."""

    def __init__(self) -> None:
        self._client = _OTLPHTTPClient(
            transport=_transport(),
            endpoint=_resolve_endpoint(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, "v1/traces"),
            kind="spans",
            timeout=_resolve_timeout(OTEL_EXPORTER_OTLP_TRACES_TIMEOUT),
            compression=_resolve_compression(OTEL_EXPORTER_OTLP_TRACES_COMPRESSION),
            headers=_resolve_headers(None, OTEL_EXPORTER_OTLP_TRACES_HEADERS),
            logger=logging.getLogger(CLIENT_LOGGER),
        )
        self._shutdown = False

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

    def shutdown(self) -> None:
        # Twice when a process's exit stopped waiting for its last spans (relay.tracing.setup:
        # once to end the retries, then by the processor).
        if not self._shutdown:
            self._shutdown = True
            self._client.shutdown()  # ends a retry's wait and closes the connections

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # nothing is held here: the processor holds what is not sent


def _transport() -> BaseHTTPTransport:
    """The SDK's urllib3 transport, with the certificates the variables name (as the official
    exporter reads them); its requests transport where a credential provider (a requests
    session, `OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER`) is named."""
    env = os.environ
    verify: bool | str = (
        env.get(OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE)
        or env.get(OTEL_EXPORTER_OTLP_CERTIFICATE)
        or True
    )
    key = env.get(OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY) or env.get(OTEL_EXPORTER_OTLP_CLIENT_KEY)
    certificate = env.get(OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE) or env.get(
        OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE
    )
    cert = (certificate, key) if certificate and key else certificate
    session = _load_session_from_envvar("OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER")
    if session is not None:
        return RequestsHTTPTransport(verify=verify, cert=cert, session=session)
    return Urllib3HTTPTransport(verify=verify, cert=cert)
