"""What callers may send, validated before anything reaches Chamelaion or Redis.

Unknown fields are refused (422), not silently dropped: a typo such as `callbak_url` would
otherwise lose the caller's callback without a word. Only the fields Chamelaion documents are
forwarded; `callback_url` is the relay's own.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StringConstraints

from relay.delivery.netpolicy import MAX_URL_LENGTH, parse_callback_url
from relay.errors import CallbackUrlRejected

MAX_REFERENCE_ID_LENGTH = 256
MAX_ID_LENGTH = 256
MAX_METADATA_BYTES = 4096
EVENT_TYPES = ("lipsync.processing", "lipsync.completed", "lipsync.failed")


# Whitespace (`\s` is what str.isspace() says, in a str pattern) and the C0 controls: one
# regex search costs a fifth of a Python loop over the URL's characters.
_INVISIBLE = re.compile(r"[\s\x00-\x1f]")


def _http_url(value: str) -> str:
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest or rest.startswith("/"):
        raise ValueError("must be an http:// or https:// URL")
    if _INVISIBLE.search(value) is not None:
        raise ValueError("must not contain whitespace or control characters")
    return value


def _callback_url(value: str) -> str:
    try:
        return parse_callback_url(value).url
    except CallbackUrlRejected as exc:
        raise ValueError(exc.reason) from None


def _events(value: list[str]) -> list[str]:
    if len(set(value)) != len(value):
        raise ValueError("must not name an event twice")
    return value


def _metadata(value: dict[str, Any]) -> dict[str, Any]:
    try:
        encoded = orjson.dumps(value)
    except orjson.JSONEncodeError:
        # Nested deeper than orjson writes (255 levels), which its reader (1,024) still takes.
        raise ValueError("is nested too deeply") from None
    if len(encoded) > MAX_METADATA_BYTES:
        raise ValueError(f"must be at most {MAX_METADATA_BYTES} bytes as JSON")
    return value


# Which events a job's callback gets (default: the final ones), after Replicate's filter.
CallbackEvents = Annotated[
    list[Literal["lipsync.processing", "lipsync.completed", "lipsync.failed"]],
    Field(min_length=1, max_length=3),
    AfterValidator(_events),
]
# Echoed in every callback beside `data`, never sent to Chamelaion.
CallbackMetadata = Annotated[dict[str, Any], AfterValidator(_metadata)]

HttpUrlText = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_URL_LENGTH), AfterValidator(_http_url)
]
# Syntax only; where the URL points is checked against the network policy by the API.
CallbackUrl = Annotated[str, AfterValidator(_callback_url)]
ReferenceId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_REFERENCE_ID_LENGTH)]


class MediaInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["video", "audio"]
    url: HttpUrlText


def _one_of_each(inputs: list[MediaInput]) -> list[MediaInput]:
    kinds = sorted(item.type for item in inputs)
    if kinds != ["audio", "video"]:
        raise ValueError("must hold exactly one video input and one audio input")
    return inputs


class CallbackOptions(BaseModel):
    """The relay's own fields, the same on both submit routes: the JSON body has them beside
    Chamelaion's, the upload form (relay.api.multipart) collects them from its parts."""

    model_config = ConfigDict(extra="forbid", strict=True)

    callback_url: CallbackUrl | None = None
    callback_events: CallbackEvents | None = None
    callback_metadata: CallbackMetadata | None = None

    def stored_metadata(self) -> bytes | None:
        """The metadata as the job keeps it (JSON object bytes), None when there is none."""
        return orjson.dumps(self.callback_metadata) if self.callback_metadata else None


class GenerateRequest(CallbackOptions):
    inputs: Annotated[
        list[MediaInput], Field(min_length=2, max_length=2), AfterValidator(_one_of_each)
    ]
    disable_active_speaker_detection: StrictBool | None = None
    reference_id: ReferenceId | None = None

    def upstream_body(self) -> dict[str, Any]:
        """Exactly the fields Chamelaion documents, as the caller set them."""
        return self.model_dump(exclude_none=True, exclude=RELAY_FIELDS)


# The relay's own fields: never forwarded to Chamelaion.
RELAY_FIELDS = {"callback_url", "callback_events", "callback_metadata"}
