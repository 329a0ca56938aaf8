"""The sandbox's test-control endpoints under /_sandbox (no auth; not part of Chamelaion).

They let a test make the upstream misbehave on cue (errors, slowness, lost or odd jobs), on
the next calls or at random on a share of them, and then look at what the relay actually sent:
the JSON bodies, the uploaded bytes' sizes and hashes, how often and when each endpoint was
called, and how many upstream jobs the generate calls made for each reference_id.
"""

from __future__ import annotations

import json
import random
from collections.abc import Collection
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from relay.sandbox.errors import SandboxError
from relay.sandbox.state import MALFORMED_KINDS, Fault, SandboxState, UpstreamJob

FAULT_GROUPS = ("poll", "generate", "all")
_FAULT_FIELDS = frozenset(
    {
        "status",
        "count",
        "rate",
        "retry_after",
        "paths",
        "delay",
        "when",
        "error",
        "malformed",
        "grow",
        "vanish",
    },
)
_FINISH_FIELDS = frozenset({"ids"})
_STATUS_FIELDS = frozenset({"status", "extra", "drop"})
_CREATE_FIELDS = frozenset({"count", "queued_seconds", "processing_seconds", "spread_over"})
_MAX_CREATE = 200_000


async def _json_object(request: Request, allowed: Collection[str]) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw) if raw.strip() else {}
    except ValueError as exc:
        raise SandboxError(400, "request body must be a JSON object") from exc
    if not isinstance(body, dict):
        raise SandboxError(400, "request body must be a JSON object")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise SandboxError(400, f"unknown fields: {', '.join(unknown)}")
    return body


def _number(body: dict[str, Any], name: str, default: float | None) -> float | None:
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise SandboxError(400, f"{name} must be a number >= 0")
    return float(value)


def _rate(body: dict[str, Any]) -> float | None:
    rate = body.get("rate")
    if rate is None:
        return None
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate <= 1:
        raise SandboxError(400, "rate must be a number above 0 and at most 1")
    return float(rate)


def _rows(body: dict[str, Any], name: str) -> int:
    value = body.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_CREATE:
        raise SandboxError(400, f"{name} must be an integer from 0 to {_MAX_CREATE}")
    return value


def parse_fault(body: dict[str, Any], route_keys: Collection[str]) -> Fault:
    """A fault from its JSON: `count` calls in a row (default 1), or with `rate`, that share of
    the matching calls (`count` times at most when given, else until the faults are cleared)."""
    rate = _rate(body)
    status, count = body.get("status"), body.get("count", None if rate is not None else 1)
    if status is not None and not (isinstance(status, int) and 400 <= status <= 599):
        raise SandboxError(400, "status must be an HTTP error status (400-599) or null")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise SandboxError(400, "count must be an integer >= 1")
    paths = body.get("paths", "all")
    if paths not in FAULT_GROUPS and paths not in route_keys:
        raise SandboxError(400, f"paths must be one of {FAULT_GROUPS} or a route key")
    when = body.get("when", "before")
    if when not in ("before", "after"):
        raise SandboxError(400, 'when must be "before" or "after"')
    error = body.get("error")
    if error is not None and not isinstance(error, str):
        raise SandboxError(400, "error must be a string")
    delay = _number(body, "delay", 0.0) or 0.0
    malformed = body.get("malformed")
    if malformed is not None and malformed not in MALFORMED_KINDS:
        raise SandboxError(400, f"malformed must be one of {MALFORMED_KINDS}")
    if malformed is not None and status is not None:
        raise SandboxError(400, "a malformed answer is a 200: it takes no status")
    grow, vanish = _rows(body, "grow"), _rows(body, "vanish")
    if status is None and not (delay or malformed or grow or vanish):
        raise SandboxError(
            400, "a fault needs a status, a delay, a malformed answer or a change to the list"
        )
    return Fault(
        status=status,
        remaining=count,
        paths=paths,
        retry_after=_number(body, "retry_after", None),
        delay=delay,
        after_handling=when == "after",
        error=error,
        rate=rate,
        malformed=malformed,
        grow=grow,
        vanish=vanish,
    )


class SandboxControl:
    def __init__(self, state: SandboxState, route_keys: Collection[str]) -> None:
        self._state = state
        self._route_keys = route_keys

    def _job(self, request: Request) -> UpstreamJob:
        job = self._state.find(request.path_params["id"])
        if job is None:
            raise SandboxError(404, "lipsync request not found")
        return job

    async def add_fault(self, request: Request) -> Response:
        fault = parse_fault(await _json_object(request, _FAULT_FIELDS), self._route_keys)
        self._state.faults.append(fault)
        return JSONResponse({"status": "ok", "pending_faults": len(self._state.faults)})

    async def clear_faults(self, request: Request) -> Response:
        self._state.faults.clear()
        return JSONResponse({"status": "ok"})

    async def create_jobs(self, request: Request) -> Response:
        """Create `count` jobs at once (as many generate calls would, minus the rate limit).

        `processing_seconds` is a number or `[low, high]`: each job draws its own from the range.
        `spread_over`: the jobs were made evenly over that many seconds up to now, oldest first
        (as many submissions over time would have; default 0: all now).
        """
        body = await _json_object(request, _CREATE_FIELDS)
        count = body.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= _MAX_CREATE:
            raise SandboxError(400, f"count must be an integer from 1 to {_MAX_CREATE}")
        queued = _number(body, "queued_seconds", self._state.config.queued_seconds) or 0.0
        spread = body.get("processing_seconds", self._state.config.processing_seconds)
        if not isinstance(spread, list):
            spread = [spread, spread]
        if len(spread) != 2:
            raise SandboxError(400, "processing_seconds must be a number or [low, high]")
        low = _number({"processing_seconds": spread[0]}, "processing_seconds", 0.0) or 0.0
        high = _number({"processing_seconds": spread[1]}, "processing_seconds", 0.0) or 0.0
        if high < low:
            raise SandboxError(400, "processing_seconds: high must be >= low")
        over = _number(body, "spread_over", 0.0) or 0.0
        jobs = [
            self._state.create_job(
                reference_id=None,
                fails=False,
                durations=(queued, low + random.random() * (high - low)),  # noqa: S311
                age=over * (1 - n / count),
            )
            for n in range(count)
        ]
        # When each job finishes, on the sandbox's clock (time.monotonic unless a test set one).
        finishes = [job.created_monotonic + sum(job.durations or (0, 0)) for job in jobs]
        return JSONResponse({"ids": [job.id for job in jobs], "finishes": finishes})

    async def forget(self, request: Request) -> Response:
        del self._state.jobs[self._job(request).id]
        return JSONResponse({"status": "ok"})

    async def set_status(self, request: Request) -> Response:
        job = self._job(request)
        body = await _json_object(request, _STATUS_FIELDS)
        status, extra, drop = body.get("status"), body.get("extra", {}), body.get("drop", [])
        if status is not None and not isinstance(status, str):
            raise SandboxError(400, "status must be a string")
        if not isinstance(extra, dict):
            raise SandboxError(400, "extra must be an object")
        if not isinstance(drop, list) or not all(isinstance(name, str) for name in drop):
            raise SandboxError(400, "drop must be a list of field names")
        if status is not None:
            job.pinned_status = status
        job.overrides.update(extra)
        job.dropped.difference_update(extra)  # a field set again is no longer dropped
        job.dropped.update(drop)
        return JSONResponse(self._state.render(job))

    async def uploads(self, request: Request) -> Response:
        job = self._job(request)
        if job.uploads is None:
            raise SandboxError(404, "this request was not created by generate-with-media")
        return JSONResponse(job.uploads)

    async def body(self, request: Request) -> Response:
        job = self._job(request)
        if job.json_body is None:
            raise SandboxError(404, "this request was not created by generate")
        return Response(job.json_body, media_type="application/json")

    async def finish(self, request: Request) -> Response:
        """Finish requests now (`ids`, default every unfinished one a generate call made)."""
        body = await _json_object(request, _FINISH_FIELDS)
        ids = body.get("ids")
        if ids is not None and not (
            isinstance(ids, list) and all(isinstance(rid, str) for rid in ids)
        ):
            raise SandboxError(400, "ids must be a list of request ids")
        return JSONResponse({"at": self._state.finish_now(ids)})

    async def finishes(self, request: Request) -> Response:
        """When each request a generate call made finishes, on the sandbox's clock."""
        return JSONResponse(self._state.finishes())

    async def stats(self, request: Request) -> Response:
        return JSONResponse(
            {
                "calls": dict(self._state.calls),
                "timestamps": {key: list(times) for key, times in self._state.timestamps.items()},
                "in_flight": dict(self._state.in_flight),
                "peak_in_flight": dict(self._state.peak_in_flight),
                "created": self._state.created,
                "created_by_reference": self._state.created_by_reference,
                "faults_fired": {
                    key: dict(fired) for key, fired in self._state.faults_fired.items()
                },
                "faults_fired_at": {
                    key: list(fired) for key, fired in self._state.faults_fired_at.items()
                },
            }
        )

    async def reset(self, request: Request) -> Response:
        self._state.reset()
        return JSONResponse({"status": "ok"})
