"""The generate-with-media form, checked part by part as it arrives and passed on byte for byte.

`MediaForm.feed` takes the caller's body chunk by chunk and returns the bytes to send upstream:
the caller's own bytes, in order, minus the relay's own parts (`callback_url`, `callback_events`,
`callback_metadata`: relay.api.callback_fields), which it keeps for itself. Nothing is
re-encoded, so a chunk of file data normally goes on as the very object that came in. Only
part headers (16 KiB at most), the small text fields and a possible partial delimiter at a
chunk's end are ever held. A problem raises ApiError as soon as it is known.

The closing delimiter is only handed out by `finish`, once the whole body has been checked, so
an upload refused for any reason reaches Chamelaion as a body without an end, which it cannot
accept. Because the bytes pass through unchanged, the size of what goes upstream is known from
the caller's Content-Length (`promise`); a relay part met after that point is made up for with
epilogue bytes after the closing delimiter, which every multipart reader ignores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum, auto

from pydantic import TypeAdapter, ValidationError

from relay.api.callback_fields import CallbackFields, invalid, is_callback_field, repeatable
from relay.api.models import CallbackOptions, ReferenceId
from relay.errors import ApiError

FILE_PARTS = ("video", "audio")
BOOL_FIELD = "disable_active_speaker_detection"
# Chamelaion's text fields, with the relay's check for each (the same as for a JSON body).
_TEXT_FIELDS: dict[str, TypeAdapter[str]] = {"reference_id": TypeAdapter(ReferenceId)}
# A form carries a boolean as text: any spelling Go's strconv.ParseBool takes, as Chamelaion's
# server does.
_BOOLS = frozenset(
    {"1", "t", "T", "TRUE", "true", "True", "0", "f", "F", "FALSE", "false", "False"}
)
# Far above any valid value (a URL is at most 2,048 characters): a longer field is refused
# without being held.
MAX_FIELD_BYTES = 16 * 1024
MAX_HEADER_BYTES = 16 * 1024
# A boundary line's transport padding, the preamble and the epilogue carry nothing; real
# clients send none of them, so a little is allowed and more is refused.
MAX_FILLER_BYTES = 1024
_CRLF = b"\r\n"
# RFC 2046: 1 to 70 of these characters, the last not a space.
_BOUNDARY = re.compile(rb"[0-9A-Za-z'()+_,./:=? -]{0,69}[0-9A-Za-z'()+_,./:=?-]")
_TOKEN = re.compile(rb"[0-9A-Za-z'+_.-]+")
# RFC 7230 token characters, then either a quoted string (with backslash escapes) or a token.
_PARAM = re.compile(r';\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')
_ESCAPE = re.compile(r"\\(.)")


def parse_header_value(value: str, *, strict: bool = False) -> tuple[str, dict[str, str]]:
    """Split `form-data; name="x"` into its lowercased main value and its parameters.

    `strict` (part headers) refuses, as a malformed body, what common readers could read
    differently: text that is not a parameter (Go's mime.ParseMediaType then fails and the
    part has no name), a parameter given twice (Go fails; others take the first or the last)
    and RFC 2231 `name*` (Go decodes it into `name`; others ignore it).
    """
    main, _, rest = value.partition(";")
    text = ";" + rest
    params: dict[str, str] = {}
    at = 0
    for match in _PARAM.finditer(text):
        if strict and text[at : match.start()].strip():
            raise _malformed("a part's Content-Disposition has text that is not a parameter")
        at = match.end()
        raw = match.group(2)
        if raw.startswith('"'):
            raw = _ESCAPE.sub(r"\1", raw[1:-1])
        key = match.group(1).lower()
        if strict and (key in params or key == "name*"):
            raise _malformed(f"a part's Content-Disposition has an ambiguous {key} parameter")
        params[key] = raw
    if strict and text[at:].strip() not in ("", ";"):
        raise _malformed("a part's Content-Disposition has text that is not a parameter")
    return main.strip().lower(), params


def boundary_of(content_type: str) -> bytes:
    """The boundary of a multipart/form-data Content-Type; 415 or 400 when there is none."""
    main, params = parse_header_value(content_type)
    if main != "multipart/form-data":
        raise ApiError(415, "request body must be multipart/form-data")
    boundary = params.get("boundary", "").encode("latin-1", errors="replace")
    if not _BOUNDARY.fullmatch(boundary):
        raise ApiError(400, "multipart/form-data needs a valid boundary (RFC 2046)")
    return boundary


def content_type(boundary: bytes) -> str:
    """The Content-Type that announces `boundary`, quoted where RFC 2045 needs it."""
    text = boundary.decode("ascii")
    quoted = text if _TOKEN.fullmatch(boundary) else '"' + text + '"'
    return f"multipart/form-data; boundary={quoted}"


def _malformed(problem: str) -> ApiError:
    return ApiError(400, f"malformed multipart body: {problem}")


class _State(Enum):
    PREAMBLE = auto()
    DELIMITER = auto()  # at a "--boundary", with what follows it still to read
    HEADERS = auto()
    DATA = auto()
    DONE = auto()  # the closing delimiter has been seen


@dataclass
class _Part:
    name: str
    is_file: bool
    forwarded: bool
    value: bytearray = field(default_factory=bytearray)


class MediaForm:
    def __init__(self, boundary: bytes) -> None:
        self.boundary = boundary
        self.fields: dict[str, str] = {}  # Chamelaion's text fields, checked
        self.callback = CallbackFields()
        self.file_sizes: dict[str, int] = {}
        self._dash_boundary = b"--" + boundary
        self._delimiter = _CRLF + self._dash_boundary
        self._state = _State.PREAMBLE
        self._held = b""  # input not yet passed on or dropped: too little to decide about
        self._part: _Part | None = None
        self._seen: set[str] = set()
        self._tail = b""  # the closing delimiter and any epilogue, for `finish`
        self._out: list[bytes] = []
        self._sent = 0  # bytes handed out for upstream
        self._dropped = 0  # input bytes left out: the relay's own parts
        self._promised: int | None = None

    @property
    def options(self) -> CallbackOptions:
        """The relay's own fields, as checked so far (all of them once `finish` passed)."""
        return self.callback.options

    @property
    def callback_url(self) -> str | None:
        return self.callback.options.callback_url

    @property
    def reference_id(self) -> str | None:
        return self.fields.get("reference_id")

    @property
    def streaming_file(self) -> bool:
        """True once a file part has begun: from here on, its bytes go upstream as they come."""
        return bool(self.file_sizes)

    def promise(self, body_length: int) -> int:
        """Fix the upstream body's size from the caller's Content-Length; return it."""
        self._promised = body_length - self._dropped
        return self._promised

    def feed(self, chunk: bytes) -> list[bytes]:
        """Parse one chunk of the caller's body; return what is now ready to go upstream."""
        data, self._held = (self._held + chunk if self._held else chunk), b""
        at = 0
        while at < len(data) and self._state is not _State.DONE:
            at = self._step(data, at)
        if self._state is _State.DONE:
            self._tail += data[at:]
            if len(self._tail) > len(self._dash_boundary) + 2 + MAX_FILLER_BYTES:
                raise _malformed("too much data after the closing boundary")
        out, self._out = self._out, []
        return out

    def finish(self) -> bytes:
        """Check the complete form; return the end of the body that makes it complete upstream."""
        if self._state is not _State.DONE:
            raise _malformed("it ended before its closing boundary")
        missing = [name for name in FILE_PARTS if name not in self.file_sizes]
        if missing:
            raise invalid(missing[0], "a file part is required")
        tail = self._tail
        if self._promised is not None:
            # A relay part dropped after the promise leaves room to fill (see above).
            filler = self._promised - self._sent - len(tail)
            if filler < 0:
                raise ApiError(500, "the upload's size was miscounted")
            tail += (_CRLF * (filler // 2 + 1))[:filler]
        self._sent += len(tail)
        return tail

    def _step(self, data: bytes, at: int) -> int:
        """Advance from `at` as far as `data` allows; return where it stopped."""
        if self._state is _State.DATA:
            return self._data(data, at)
        if self._state is _State.PREAMBLE:
            return self._preamble(data, at)
        if self._state is _State.DELIMITER:
            return self._delimiter_line(data, at)
        return self._headers(data, at)

    def _preamble(self, data: bytes, at: int) -> int:
        # The first delimiter has no CRLF before it unless a preamble does.
        if data.startswith(self._dash_boundary, at):
            self._state = _State.DELIMITER
            return at
        found = data.find(self._delimiter, at)
        if found < 0 or found - at > MAX_FILLER_BYTES:
            if len(data) - at > MAX_FILLER_BYTES + len(self._delimiter):
                raise _malformed("it does not start with its boundary")
            return self._hold(data, at)
        self._forward(data, at, found + 2)
        self._state = _State.DELIMITER
        return found + 2

    def _delimiter_line(self, data: bytes, at: int) -> int:
        # `at` is a "--boundary"; what follows says: "--" the end, or (padding and) a CRLF.
        after = at + len(self._dash_boundary)
        if len(data) - after < 2:
            return self._hold(data, at)
        if data.startswith(b"--", after):
            self._state = _State.DONE
            self._tail = data[at:after]
            return after
        line_end = data.find(_CRLF, after, after + MAX_FILLER_BYTES + 2)
        if line_end < 0:
            if len(data) - after > MAX_FILLER_BYTES + 2:
                raise _malformed("a boundary line is too long")
            return self._hold(data, at)
        if data[after:line_end].strip(b" \t"):
            raise _malformed("a boundary line has text after the boundary")
        self._state = _State.HEADERS
        return self._headers(data, at)

    def _headers(self, data: bytes, at: int) -> int:
        # `at` is still the part's "--boundary": its head is passed on, or not, as a whole.
        line_end = data.index(_CRLF, at)
        if data.startswith(_CRLF, line_end + 2):
            block_end = line_end + 4
        else:
            found = data.find(_CRLF * 2, line_end + 2)
            if found < 0:
                if len(data) - line_end > MAX_HEADER_BYTES:
                    raise _malformed("a part's headers are too large")
                return self._hold(data, at)
            block_end = found + 4
        if block_end - line_end > MAX_HEADER_BYTES:
            # However the bytes were chunked: a block found whole in one chunk counts too.
            raise _malformed("a part's headers are too large")
        self._part = self._start_part(data[line_end + 2 : block_end - 4])
        self._emit(data, at, block_end)
        self._state = _State.DATA
        return block_end

    def _data(self, data: bytes, at: int) -> int:
        found = data.find(self._delimiter, at)
        if found >= 0:
            self._part_data(data, at, found)
            self._emit(data, found, found + 2)  # the CRLF ends this part
            self._end_part()
            self._state = _State.DELIMITER
            return found + 2
        # The delimiter holds one CR, at its start: only a last CR can begin a partial one.
        end = len(data)
        cr = data.rfind(b"\r", max(at, end - len(self._delimiter) + 1))
        if cr >= 0 and self._delimiter.startswith(data[cr:]):
            end = cr
        self._part_data(data, at, end)
        return self._hold(data, end)

    def _hold(self, data: bytes, at: int) -> int:
        self._held = data[at:]
        return len(data)

    def _start_part(self, block: bytes) -> _Part:
        disposition = ""
        lines = block.decode("utf-8", errors="replace").split("\r\n") if block else []
        headers: set[str] = set()
        for line in lines:
            header, colon, value = line.partition(":")
            if not colon or not header or header != header.strip():
                raise _malformed("a part has a malformed header line")
            if header.lower() in headers:
                # Readers differ on which of two copies counts (Go takes the first): the
                # relay would check one part and Chamelaion act on another.
                raise _malformed(f"a part has more than one {header} header")
            headers.add(header.lower())
            if header.lower() == "content-disposition":
                disposition = value.strip()
        kind, params = parse_header_value(disposition, strict=True)
        name = params.get("name", "")
        if kind != "form-data" or not name:
            raise _malformed("a part has no form-data name")
        is_file = "filename" in params or "filename*" in params
        relay_field = is_callback_field(name)
        if name in self._seen:
            raise invalid(name, "appears more than once")
        if name in FILE_PARTS and not is_file:
            raise invalid(name, "must be a file part (with a filename)")
        if name not in FILE_PARTS and is_file:
            raise invalid(name, "is a file part; only video and audio may be files")
        known = relay_field or name == BOOL_FIELD or name in _TEXT_FIELDS
        if name not in FILE_PARTS and not known:
            raise invalid(name, "is not a field this endpoint takes")
        if not repeatable(name):
            self._seen.add(name)
        if is_file:
            self.file_sizes[name] = 0
        return _Part(name, is_file, forwarded=not relay_field)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        assert part is not None
        if part.is_file:
            self.file_sizes[part.name] += end - start
        elif len(part.value) + end - start > MAX_FIELD_BYTES:
            raise invalid(part.name, f"is longer than {MAX_FIELD_BYTES} bytes")
        else:
            part.value += data[start:end]
        self._emit(data, start, end)

    def _end_part(self) -> None:
        part = self._part
        assert part is not None
        self._part = None
        if part.is_file:
            return
        name = part.name
        try:
            value = part.value.decode("utf-8")
        except UnicodeDecodeError:
            raise invalid(name, "must be UTF-8 text") from None
        if not part.forwarded:
            self.callback.add(name, value)
            return
        if name == BOOL_FIELD and value not in _BOOLS:
            raise invalid(name, "must be a boolean (true or false)")
        if name in _TEXT_FIELDS:
            try:
                value = _TEXT_FIELDS[name].validate_python(value)
            except ValidationError as exc:
                raise invalid(name, exc.errors(include_url=False)[0]["msg"]) from None
        self.fields[name] = value

    def _emit(self, data: bytes, start: int, end: int) -> None:
        """Pass data[start:end] on, or drop it when it belongs to a relay part."""
        if end <= start:
            return
        if self._part is not None and not self._part.forwarded:
            self._dropped += end - start
            return
        self._forward(data, start, end)

    def _forward(self, data: bytes, start: int, end: int) -> None:
        # A whole chunk goes on as the same object: no copy.
        self._out.append(data if start == 0 and end == len(data) else data[start:end])
        self._sent += end - start
