"""Malformed 200 answers: what a broken proxy, a half-deployed upstream or a bug could send.

Each kind turns the answer an endpoint gave into one a client must survive: an HTML page,
JSON cut off mid-way, fields of the wrong JSON types, rows without their `id`, a list whose
total is negative, or a valid answer padded to 8 MB.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response

from relay.sandbox.state import Malformed

PADDING_BYTES = 8 * 1024 * 1024
HTML = (
    b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>"
    b"<body><h1>Bad Gateway</h1><p>The upstream server is not answering.</p></body></html>"
)


def malform(kind: Malformed, answer: Response) -> Response:
    """`answer` (a JSON object, as every sandbox endpoint sends) spoilt as `kind` says."""
    if kind == "html":
        return Response(HTML, status_code=200, media_type="text/html")
    raw = bytes(answer.body)
    if kind == "truncated":
        return _json(raw[: max(1, len(raw) // 2)])
    body: dict[str, Any] = json.loads(raw)
    rows: list[dict[str, Any]] = body["data"] if isinstance(body.get("data"), list) else [body]
    if kind == "wrong_types":
        for row in rows:
            # The id is left alone, so a client that matches rows by id meets the rest.
            row["status"] = 3
            row["created_at"] = 1_700_000_000
            row["reference_id"] = ["not", "a", "string"]
    elif kind == "no_ids":
        for row in rows:
            row.pop("id", None)
    elif kind == "negative_total":
        if isinstance(body.get("pagination"), dict):
            body["pagination"]["total"] = -1
    elif kind == "padding":
        body["padding"] = "x" * PADDING_BYTES
    return _json(json.dumps(body).encode())


def _json(raw: bytes) -> Response:
    return Response(raw, status_code=200, media_type="application/json")
