"""The sandbox's Chamelaion endpoints: generate, generate-with-media, and the request reads.

Input checks are deliberately stricter than Chamelaion documents: an unknown field, a null, or
an empty reference_id is a 400, so a relay that forwards anything beyond the documented fields
(a `callback_url`, say) fails its tests instead of leaking it upstream.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from relay.sandbox.errors import SandboxError
from relay.sandbox.multipart import (
    MultipartError,
    MultipartParser,
    PartData,
    PartEnd,
    PartStart,
    boundary_from,
)
from relay.sandbox.state import SandboxState

_GENERATE_FIELDS = frozenset({"inputs", "disable_active_speaker_detection", "reference_id"})
_FILE_PARTS = ("video", "audio")
_FORM_FIELDS = ("disable_active_speaker_detection", "reference_id")
_MAX_FIELD_BYTES = 64 * 1024
# strconv.ParseBool's spellings, which a Go server such as Chamelaion's accepts in a form.
_BOOLS = frozenset(
    {"1", "t", "T", "TRUE", "true", "True", "0", "f", "F", "FALSE", "false", "False"}
)
_DEFAULT_LIMIT = 20


def _bad(message: str) -> SandboxError:
    return SandboxError(400, message)


def _fails(*markers: str | None) -> bool:
    return any(marker is not None and "fail" in marker for marker in markers)


def _reject_constant(name: str) -> Any:
    raise _bad(f"invalid JSON: {name} is not a number")


def _check_optional(body: dict[str, Any]) -> str | None:
    """Check the two optional fields both generate endpoints share; return the reference_id."""
    if "disable_active_speaker_detection" in body and not isinstance(
        body["disable_active_speaker_detection"], bool
    ):
        raise _bad("disable_active_speaker_detection must be a boolean")
    reference_id = body.get("reference_id")
    if "reference_id" in body and not (isinstance(reference_id, str) and reference_id):
        raise _bad("reference_id must be a non-empty string")
    return reference_id


def parse_generate_body(raw: bytes) -> tuple[str, str | None]:
    """Validate a /generate body; return its video URL and reference_id."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad("request body must be a JSON object") from exc
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    for name in body:
        if name not in _GENERATE_FIELDS:
            raise _bad(f'unknown field "{name}"')
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 2:
        raise _bad("inputs must hold exactly one video and one audio input")
    urls: dict[str, str] = {}
    for item in inputs:
        if not isinstance(item, dict) or set(item) != {"type", "url"}:
            raise _bad("each input must be an object with exactly type and url")
        kind, url = item["type"], item["url"]
        if kind not in ("video", "audio"):
            raise _bad('input type must be "video" or "audio"')
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise _bad("input url must be an http(s) URL")
        urls[kind] = url
    if len(urls) != 2:
        raise _bad("inputs must hold exactly one video and one audio input")
    return urls["video"], _check_optional(body)


async def drain(request: Request) -> None:
    """Read and drop the rest of a body, so an early answer reaches a client still uploading.

    Answering while a big upload is still arriving makes the server close the connection, and
    the client then sees a broken pipe instead of the status it was sent.
    """
    with contextlib.suppress(ClientDisconnect):
        async for _ in request.stream():
            pass


@dataclass
class _Receiving:
    """The part being read: a file is hashed as it streams, a field is kept (small, capped)."""

    start: PartStart
    size: int = 0
    sha256: Any = field(default_factory=hashlib.sha256)
    value: bytearray = field(default_factory=bytearray)


async def receive_media_form(request: Request) -> tuple[dict[str, Any], dict[str, str]]:
    """Stream a generate-with-media body; return its files' summaries and its fields."""
    try:
        parser = MultipartParser(boundary_from(request.headers.get("content-type", "")))
    except MultipartError as exc:
        await drain(request)
        raise _bad(str(exc)) from exc
    files: dict[str, Any] = {}
    fields: dict[str, str] = {}
    problem: str | None = None
    part: _Receiving | None = None
    async for chunk in request.stream():
        if problem is not None:
            continue  # keep draining: answering mid-upload breaks the client's pipe instead
        try:
            events = parser.feed(chunk)
        except MultipartError as exc:
            problem = str(exc)
            continue
        for event in events:
            if isinstance(event, PartStart):
                problem = _unexpected_part(event, files, fields)
                part = _Receiving(event)
            elif isinstance(event, PartData) and part is not None:
                part.size += len(event.data)
                if part.start.filename is not None:
                    part.sha256.update(event.data)
                elif part.size > _MAX_FIELD_BYTES:
                    problem = f"{part.start.name} is too long"
                else:
                    part.value += event.data
            elif isinstance(event, PartEnd) and part is not None:
                problem = _finish_part(part, files, fields)
                part = None
            if problem is not None:
                break
    if problem is None and not parser.done:
        problem = "multipart body ended before its closing boundary"
    if problem is not None:
        raise _bad(problem)
    for name in _FILE_PARTS:
        if name not in files:
            raise _bad(f"{name} file is required")
        if files[name]["bytes"] == 0:
            raise _bad(f"{name} file is empty")
    return files, fields


def _unexpected_part(start: PartStart, files: dict[str, Any], fields: dict[str, str]) -> str | None:
    if start.name in files or start.name in fields:
        return f'duplicate field "{start.name}"'
    if start.name in _FILE_PARTS:
        return None if start.filename is not None else f"{start.name} must be a file"
    if start.name in _FORM_FIELDS:
        return None if start.filename is None else f"{start.name} must not be a file"
    return f'unknown field "{start.name}"'


def _finish_part(part: _Receiving, files: dict[str, Any], fields: dict[str, str]) -> str | None:
    name = part.start.name
    if part.start.filename is not None:
        files[name] = {
            "bytes": part.size,
            "sha256": part.sha256.hexdigest(),
            "filename": part.start.filename,
            "content_type": part.start.content_type,
        }
        return None
    try:
        value = part.value.decode("utf-8")
    except UnicodeDecodeError:
        return f"{name} must be UTF-8 text"
    if name == "disable_active_speaker_detection" and value not in _BOOLS:
        return "disable_active_speaker_detection must be a boolean"
    if name == "reference_id" and not value:
        return "reference_id must be a non-empty string"
    fields[name] = value
    return None


def _query_int(request: Request, name: str, default: int, minimum: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise _bad(f"{name} must be an integer >= {minimum}")
    return value


class SandboxApi:
    def __init__(self, state: SandboxState) -> None:
        self._state = state

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def me(self, request: Request) -> Response:
        return JSONResponse({"name": "Sandbox"})

    async def generate(self, request: Request) -> Response:
        raw = await request.body()
        video_url, reference_id = parse_generate_body(raw)
        job = self._state.create_job(
            reference_id=reference_id, fails=_fails(video_url, reference_id), json_body=raw
        )
        self._state.count_created(job)
        return JSONResponse({"status": "success", "request_id": job.id})

    async def generate_with_media(self, request: Request) -> Response:
        files, fields = await receive_media_form(request)
        reference_id = fields.get("reference_id")
        # An upload has no URL to be unreachable, so the video's filename stands in for it.
        fails = _fails(files["video"]["filename"], reference_id)
        uploads = {**files, "fields": fields}
        job = self._state.create_job(reference_id=reference_id, fails=fails, uploads=uploads)
        self._state.count_created(job)
        return JSONResponse({"status": "success", "request_id": job.id})

    async def get_request(self, request: Request) -> Response:
        job = self._state.find(request.path_params["id"])
        if job is None:
            raise SandboxError(404, "lipsync request not found")
        return JSONResponse(self._state.render(job))

    async def list_requests(self, request: Request) -> Response:
        limit = _query_int(request, "limit", _DEFAULT_LIMIT, 1)
        offset = _query_int(request, "offset", 0, 0)
        jobs = self._state.listed(request.query_params.get("reference_id"))
        cap = self._state.config.list_max_limit
        limit = min(limit, cap) if cap is not None else limit
        page = [self._state.render(job) for job in jobs[offset : offset + limit]]
        return JSONResponse(
            {"data": page, "pagination": {"limit": limit, "offset": offset, "total": len(jobs)}}
        )
