"""The relay's own fields of an upload form, collected part by part and checked as the JSON
route checks them (relay.api.models.CallbackOptions, the same model and messages).

A form carries only text, so the fields come as the official SDK flattens a JSON body into
form-data: `callback_events[]` once per event (`callback_events` is taken too), and
`callback_metadata[key]`, `callback_metadata[key][sub]` or `callback_metadata[key][]` (a list)
per value, whose values are all text. To keep numbers, booleans, null or empty objects, the
metadata may instead come as one `callback_metadata` part holding a JSON object; not both.

Every part is checked as soon as it ends, against everything collected so far: each rule of
the model only gets stricter as values are added (an unknown event stays unknown, a size over
the cap stays over it), so a bad value is refused at its own part, before Chamelaion is
contacted when it comes before the files, and nothing grows without bound meanwhile (the
metadata is at most 4 KB as JSON).
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from pydantic import ValidationError

from relay.api.models import CallbackOptions
from relay.api.submit import validation_error
from relay.errors import ApiError

CALLBACK_URL = "callback_url"
EVENTS = "callback_events"
METADATA = "callback_metadata"
EVENT_NAMES = frozenset({EVENTS, EVENTS + "[]"})
# `[key]` segments after `callback_metadata`; a key holds no brackets (the SDK does not escape
# them, so `[a[b]]` could be read two ways).
_PATH = re.compile(r"(?:\[[^\[\]]*\])+")
_SEGMENT = re.compile(r"\[([^\[\]]*)\]")


def invalid(name: str, message: str) -> ApiError:
    return ApiError(
        422,
        f"invalid request: {name}: {message}",
        details=[{"field": name, "message": message}],
    )


def is_callback_field(name: str) -> bool:
    """A part name the relay keeps for itself (never sent to Chamelaion)."""
    if name in (CALLBACK_URL, METADATA) or name in EVENT_NAMES:
        return True
    if not name.startswith(METADATA + "["):
        return False
    if not _PATH.fullmatch(name, len(METADATA)):
        raise invalid(name, "a callback_metadata key cannot hold [ or ]")
    return True


def repeatable(name: str) -> bool:
    """A name that may come in several parts: an event each, or a list's items."""
    return name in EVENT_NAMES or name.endswith("[]")


class CallbackFields:
    def __init__(self) -> None:
        self.options = CallbackOptions()
        self._raw: dict[str, Any] = {}
        self._tree: dict[str, Any] | None = None  # metadata from bracketed fields

    def add(self, name: str, value: str) -> None:
        """Take one part's value, then check all of them; ApiError (422) for a bad one."""
        if name == CALLBACK_URL:
            self._raw[CALLBACK_URL] = value
        elif name in EVENT_NAMES:
            self._raw.setdefault(EVENTS, []).append(value)
        elif name == METADATA:
            if self._tree is not None:
                raise _both()
            try:
                self._raw[METADATA] = orjson.loads(value)
            except orjson.JSONDecodeError:
                raise invalid(
                    METADATA, "must be a JSON object (or sent as callback_metadata[key] fields)"
                ) from None
        else:
            if self._tree is None:
                if METADATA in self._raw:
                    raise _both()
                self._tree = self._raw[METADATA] = {}
            _place(self._tree, name, value)
        try:
            self.options = CallbackOptions.model_validate(self._raw)
        except ValidationError as exc:
            raise validation_error(exc) from None


def _both() -> ApiError:
    return invalid(METADATA, "is given both as one JSON part and as callback_metadata[key] fields")


def _place(tree: dict[str, Any], name: str, value: str) -> None:
    """Put a bracketed field's value where its path says, as the SDK flattened it."""
    *path, last = _SEGMENT.findall(name[len(METADATA) :])
    if not path and not last:
        raise invalid(name, "callback_metadata is an object: name a key, callback_metadata[key]")
    if "" in path:
        raise invalid(
            name,
            "a list of objects cannot be sent as form fields; send callback_metadata as "
            "one part holding a JSON object",
        )
    keys = path if not last else [*path, last]
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise invalid(name, "conflicts with another callback_metadata field")
    key = keys[-1]
    if not last:  # `[key][]`: one item of a list of text
        items = node.setdefault(key, [])
        if not isinstance(items, list):
            raise invalid(name, "conflicts with another callback_metadata field")
        items.append(value)
    elif key in node:
        raise invalid(name, "conflicts with another callback_metadata field")
    else:
        node[key] = value
