"""A streaming multipart/form-data push parser for the sandbox's upload endpoint.

Chamelaion takes video uploads that can be gigabytes, so the sandbox must see every byte (to
count and hash it) without ever holding a file. `MultipartParser.feed` turns body chunks into
part events and keeps no more than a delimiter's length of lookahead. Starlette's own form
parsing needs python-multipart, which the project does not depend on, and it spools files to
disk besides.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum, auto

_CRLF = b"\r\n"
_MAX_HEADER_BYTES = 16 * 1024
# RFC 7230 token characters, then either a quoted string (with backslash escapes) or a token.
_PARAM = re.compile(r';\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')
_ESCAPE = re.compile(r"\\(.)")


class MultipartError(ValueError):
    """The body is not well-formed multipart/form-data; the message is fit for a 400."""


@dataclass(frozen=True)
class PartStart:
    name: str
    filename: str | None
    content_type: str | None


@dataclass(frozen=True)
class PartData:
    data: bytes


@dataclass(frozen=True)
class PartEnd:
    pass


Event = PartStart | PartData | PartEnd


class _State(Enum):
    PREAMBLE = auto()
    AFTER_DELIMITER = auto()
    HEADERS = auto()
    BODY = auto()
    DONE = auto()


# The relay has a parser of its own (relay.api.multipart) and this one repeats some of it on
# purpose: the sandbox stands in for Chamelaion in the relay's tests, and a shared parser would
# share its bugs, letting a relay that garbles a form pass against a sandbox that garbles alike.
def parse_header_value(value: str) -> tuple[str, dict[str, str]]:
    """Split `form-data; name="x"` into its lowercased main value and its parameters."""
    main, _, rest = value.partition(";")
    params: dict[str, str] = {}
    for match in _PARAM.finditer(";" + rest):
        raw = match.group(2)
        if raw.startswith('"'):
            raw = _ESCAPE.sub(r"\1", raw[1:-1])
        params[match.group(1).lower()] = raw
    return main.strip().lower(), params


def boundary_from(content_type: str) -> bytes:
    main, params = parse_header_value(content_type)
    boundary = params.get("boundary", "")
    if main != "multipart/form-data" or not 1 <= len(boundary) <= 70:
        raise MultipartError("expected multipart/form-data with a boundary")
    return boundary.encode("latin-1")


class MultipartParser:
    def __init__(self, boundary: bytes) -> None:
        self._delimiter = _CRLF + b"--" + boundary
        # The first delimiter has no CRLF before it; pretending one came first lets a single
        # search find every delimiter, the first included.
        self._buffer = bytearray(_CRLF)
        self._state = _State.PREAMBLE

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    def feed(self, chunk: bytes) -> list[Event]:
        if self._state is _State.DONE:
            return []  # the epilogue carries nothing
        self._buffer += chunk
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def close(self) -> None:
        if self._state is not _State.DONE:
            raise MultipartError("multipart body ended before its closing boundary")

    def _step(self, events: list[Event]) -> bool:
        """Advance as far as the buffer allows; False when more input is needed."""
        buf = self._buffer
        if self._state is _State.PREAMBLE:
            at = buf.find(self._delimiter)
            if at < 0:
                del buf[: max(0, len(buf) - len(self._delimiter) + 1)]
                return False
            del buf[: at + len(self._delimiter)]
            self._state = _State.AFTER_DELIMITER
            return True
        if self._state is _State.AFTER_DELIMITER:
            if len(buf) < 2:
                return False
            if buf.startswith(b"--"):
                buf.clear()
                self._state = _State.DONE
                return False
            at = buf.find(_CRLF)
            if at < 0 and len(buf) <= 1024:
                return False
            if at < 0 or buf[:at].strip(b" \t"):
                raise MultipartError("malformed multipart boundary line")
            del buf[: at + 2]
            self._state = _State.HEADERS
            return True
        if self._state is _State.HEADERS:
            if buf.startswith(_CRLF):
                block, used = b"", 2
            else:
                at = buf.find(_CRLF + _CRLF)
                if at < 0:
                    if len(buf) > _MAX_HEADER_BYTES:
                        raise MultipartError("multipart part headers are too large")
                    return False
                block, used = bytes(buf[:at]), at + 4
            del buf[:used]
            events.append(_part_start(block))
            self._state = _State.BODY
            return True
        if self._state is _State.BODY:
            at = buf.find(self._delimiter)
            if at < 0:
                # Whatever could still be the start of a delimiter stays for the next chunk.
                safe = len(buf) - len(self._delimiter) + 1
                if safe > 0:
                    events.append(PartData(bytes(buf[:safe])))
                    del buf[:safe]
                return False
            if at:
                events.append(PartData(bytes(buf[:at])))
            del buf[: at + len(self._delimiter)]
            events.append(PartEnd())
            self._state = _State.AFTER_DELIMITER
            return True
        return False


def _part_start(block: bytes) -> PartStart:
    headers: dict[str, str] = {}
    for line in block.decode("utf-8", errors="replace").split("\r\n"):
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    disposition, params = parse_header_value(headers.get("content-disposition", ""))
    if disposition != "form-data" or not params.get("name"):
        raise MultipartError("multipart part without a form-data name")
    return PartStart(params["name"], params.get("filename"), headers.get("content-type"))
