"""Which jobs a request may see and steer: its caller's own, or every job for an admin.

Every route that names a job goes through here, so another caller's job is answered exactly as
a job that does not exist (the same 404, the same body): nothing says it is there. An admin
sees all, and on list routes may narrow them to one caller with `?caller=` (a caller filter).
Jobs tracked before callers were recorded have no caller: only an admin sees them.
"""

from __future__ import annotations

from starlette.requests import Request

from relay.api.auth import request_caller
from relay.api.state import AppState
from relay.callers.model import NAME, Caller
from relay.errors import ApiError
from relay.jobs.store import Job

NOT_FOUND = "no tracked job has this id or reference_id"


def owner_of(caller: Caller) -> str | None:
    """Whose jobs `caller` may see: its own (its name), or anyone's (None) for an admin."""
    return None if caller.admin else caller.name


def request_owner(request: Request) -> str | None:
    """`owner_of` the request's caller."""
    return owner_of(request_caller(request))


def list_owner(request: Request, value: str | None = None) -> str | None:
    """Whose jobs a list (or bulk) request covers: a caller's own; for an admin, the one
    caller named by `value` (default: the `caller` query parameter), or everyone's (None)."""
    caller = request_caller(request)
    wanted = request.query_params.get("caller") if value is None else value
    if not caller.admin:
        if wanted is not None and wanted != caller.name:
            raise ApiError(403, "only an admin caller may name another caller")
        return caller.name
    if wanted is None:
        return None
    if not NAME.fullmatch(wanted):
        raise ApiError(400, "caller must be a caller's name (a-z, 0-9, '-', '_')")
    return wanted


def not_found() -> ApiError:
    return ApiError(404, NOT_FOUND)


async def owned_job(state: AppState, request: Request, id_or_reference: str) -> Job:
    """The job a request id or reference_id names among those the request may see; 404."""
    job = await state.store.find_owned(id_or_reference, request_owner(request))
    if job is None:
        raise not_found()
    return job
