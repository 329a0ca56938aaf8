"""The callback payload for a job that ended, and its stable webhook-id.

Body: `{"type": "lipsync.processing" | "lipsync.completed" | "lipsync.failed", "timestamp":
ISO 8601, "data": <the LipsyncRequest object as Chamelaion returned it>, "metadata": <the
caller's object, when it gave one>}`. The webhook-id is derived from the request id
and the type, so every worker that ever builds the event for a job builds the same id.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import orjson

# Any status other than these two is still in progress, including ones Chamelaion adds later.
TERMINAL_STATUSES = {"completed": "lipsync.completed", "failed": "lipsync.failed"}
PROCESSING = "lipsync.processing"
# What a callback gets unless the job names its events.
DEFAULT_EVENTS = ("lipsync.completed", "lipsync.failed")

_NAMESPACE = uuid.UUID("6b0e4c52-4f5e-4b8e-9a57-52c1a6f3e0d1")


def event_type(status: str) -> str | None:
    return TERMINAL_STATUSES.get(status)


def webhook_id(request_id: str, type_: str) -> str:
    return "msg_" + uuid.uuid5(_NAMESPACE, f"{request_id}:{type_}").hex


def iso(seconds: float) -> str:
    """A Redis-clock (or any epoch) time as the relay shows it: UTC, milliseconds, `Z`."""
    return (
        datetime.fromtimestamp(seconds, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build_event(type_: str, data: dict[str, Any], metadata: bytes | None = None) -> bytes:
    """The callback body; `metadata` (JSON object bytes, as stored) is echoed beside `data`."""
    envelope: dict[str, Any] = {"type": type_, "timestamp": iso_now(), "data": data}
    if metadata:
        envelope["metadata"] = orjson.Fragment(metadata)
    return orjson.dumps(envelope)


def event_type_of(event: bytes | None) -> str | None:
    """The `type` of a stored callback body (None when there is none)."""
    if not event:
        return None
    value = orjson.loads(event).get("type")
    return value if isinstance(value, str) else None
