"""Reading requests: a tracked job from the relay's own state, anything else from Chamelaion.

A caller reads only its own jobs (relay.api.scoping): by id or by its own reference_id, and its
list from the relay's state in Chamelaion's list shape, never the account's whole list. An
admin reads everything, as from Chamelaion itself, or one caller's list with `?caller=`.
"""

from __future__ import annotations

import logging
import unicodedata
from urllib.parse import quote, unquote

import orjson
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from relay.api import prefer
from relay.api.models import MAX_ID_LENGTH, MAX_REFERENCE_ID_LENGTH
from relay.api.parked_reads import tracked_answer, waited
from relay.api.responses import json_bytes
from relay.api.scoping import list_owner, not_found, request_owner
from relay.api.state import app_state
from relay.api.waiting import wait_for_end
from relay.errors import ApiError
from relay.jobs.events import iso
from relay.jobs.store import Job
from relay.upstream import LIST_LIMIT_MAX, check, decode_object

log = logging.getLogger(__name__)

LIST_PARAMS = {"limit": (1, LIST_LIMIT_MAX), "offset": (0, 10**9)}


def path_segment(value: str, name: str) -> str:
    """`value` encoded as one path segment for Chamelaion; 400 when it could be read as a path.

    `.` and `..` are dot segments (`requests/..` is the list route's parent), and a value that
    becomes one, or a slash, once percent-decoded or Unicode-normalised could be read so by
    something between the relay and Chamelaion: none is a request id or a reference_id.
    """
    forms = {value, unicodedata.normalize("NFKC", value)}
    decoded = value
    for _ in range(3):
        decoded = unquote(decoded)
        forms |= {decoded, unicodedata.normalize("NFKC", decoded)}
    if any(form in (".", "..") or "/" in form or "\\" in form for form in forms):
        raise ApiError(400, f"{name} must not be a dot segment or contain a slash")
    return quote(value, safe="")


async def get_request(request: Request) -> Response:
    state = app_state(request)
    id_or_reference: str = request.path_params["id"]
    if len(id_or_reference) > MAX_ID_LENGTH:
        raise ApiError(400, f"id is longer than {MAX_ID_LENGTH} characters")
    segment = path_segment(id_or_reference, "id")
    owner = request_owner(request)
    wait = prefer.wait_seconds(request.headers, state.settings.max_wait)
    try:
        job = await state.store.find_owned(id_or_reference, owner)
    except RedisError:
        if owner is not None:
            # Only the relay's state says whose a job is: without it, nothing is shown.
            raise ApiError(503, "the relay's job store is unavailable; try again") from None
        log.warning("job store unavailable: answering from Chamelaion")
        job = None
    headers: dict[str, str] = {}
    if job is not None and wait is not None:
        # Only a tracked job can be waited on: its end is announced in Redis.
        headers = prefer.applied(wait)
        if not job.ended and wait > 0 and not waited(request):
            # Held by nothing while it waits (thousands may): what it says is read afresh.
            request_id, job = job.request_id, None
            parking = await state.parked_reads.park(request, request_id, wait)
            if parking is not None:
                return parking
            job = await wait_for_end(state, request, request_id, wait)
    if job is not None and (answer := tracked_answer(job, wait)) is not None:
        return answer
    if owner is not None:
        if job is None:
            raise not_found()
        segment = quote(job.request_id, safe="")  # its own job, not polled yet
    response = check(await state.upstream.request("GET", f"v1/lipsync/requests/{segment}"))
    decode_object(response)
    return json_bytes(response.content, headers=headers)


# Chamelaion's own default page size.
DEFAULT_LIMIT = 20


async def list_requests(request: Request) -> Response:
    state = app_state(request)
    owner = list_owner(request)
    params: dict[str, str] = {}
    for name, (low, high) in LIST_PARAMS.items():
        value = request.query_params.get(name)
        if value is None:
            continue
        if not (value.isascii() and value.isdigit()) or not low <= int(value) <= high:
            raise ApiError(400, f"{name} must be an integer from {low} to {high}")
        params[name] = str(int(value))
    reference_id = request.query_params.get("reference_id")
    if reference_id is not None:
        if not 1 <= len(reference_id) <= MAX_REFERENCE_ID_LENGTH:
            raise ApiError(400, f"reference_id must be 1 to {MAX_REFERENCE_ID_LENGTH} characters")
        params["reference_id"] = reference_id
    if owner is not None:
        return await _owned_list(request, owner, params)
    response = check(await state.upstream.request("GET", "v1/lipsync/requests", params=params))
    decode_object(response)
    return json_bytes(response.content)


async def _owned_list(request: Request, owner: str, params: dict[str, str]) -> Response:
    """One caller's jobs from the relay's state, newest first, as Chamelaion lists requests."""
    state = app_state(request)
    limit = int(params.get("limit", DEFAULT_LIMIT))
    offset = int(params.get("offset", 0))
    try:
        jobs, total = await state.store.page(
            owner, offset=offset, limit=limit, reference_id=params.get("reference_id")
        )
    except RedisError:
        raise ApiError(503, "the relay's job store is unavailable; try again") from None
    rows = b",".join(_row(job) for job in jobs)
    pagination = orjson.dumps({"limit": limit, "offset": offset, "total": total})
    return json_bytes(b'{"data":[' + rows + b'],"pagination":' + pagination + b"}")


def _row(job: Job) -> bytes:
    """A job as a list row: Chamelaion's latest answer for it, or what the relay knows until
    its first poll (it was just created: queued)."""
    if job.body is not None:
        return job.body
    row: dict[str, object] = {
        "id": job.request_id,
        "created_at": iso(job.created),
        "status": job.status or "queued",
    }
    if job.reference_id is not None:
        row["reference_id"] = job.reference_id
    return orjson.dumps(row)
