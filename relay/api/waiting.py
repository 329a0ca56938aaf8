"""`Prefer: wait` (relay.api.prefer): an answer held until the job ends, or for N seconds.

A status read (relay.api.status) and both submit routes take it. The wait is woken by the
job's end as Redis announces it (relay.api.waiters): no upstream call is made while it lasts,
and the job is read from Redis once it has ended. The answer says `Preference-Applied:
wait=N`. It comes at once when the job has ended already, when N is up (with the job as it
stands), or when the server shuts down (the same, and the connection is closed cleanly: the
client may ask again). A client that hangs up lets go of its wait at once.

A status read is parked rather than held by a task where it can be (relay.api.parked_reads):
thousands may wait on one job, and are answered together with the same bytes.

A submit's own answer (`{"status": "success", "request_id": ...}`, what an Idempotency-Key
keeps and replays) gains `request`: the job as the relay knows it, once it has read it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import orjson
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from relay.api import prefer
from relay.api.responses import JobCreated
from relay.api.state import AppState, app_state
from relay.api.waiters import RESYNC
from relay.jobs.history import ENDS
from relay.jobs.store import Job

log = logging.getLogger(__name__)

Endpoint = Callable[[Request], Awaitable[Response]]


async def wait_for_end(
    state: AppState, request: Request, request_id: str, seconds: int
) -> Job | None:
    """The job once it has ended, or as it stands after `seconds` (sooner when the server
    drains or the client hangs up); None when it is no longer tracked.

    Nothing of the job is held while the wait lasts (thousands may wait), and the waiters of
    one job woken by its end share one read of it.
    """
    waiters = state.waiters
    store = state.store
    deadline = asyncio.get_running_loop().time() + seconds
    try:
        with waiters.watch("wait", job=request_id) as waiter:
            async with waiters.listening(waiter, request):
                # Asked once the waiter is registered: an end since the caller's own read
                # would otherwise go unheard.
                ended = await store.has_ended(request_id)
                while not (ended or waiter.hung_up or waiters.draining) and seconds > 0:
                    remaining = deadline - asyncio.get_running_loop().time()
                    if remaining <= 0:
                        break
                    woken = await waiter.next(remaining)
                    if woken & RESYNC:
                        ended = await store.has_ended(request_id)
                    elif woken & ENDS:
                        ended = True  # announced by the script that ended it
                return await waiters.read_once(request_id, lambda: store.get(request_id))
    except RedisError:
        log.warning("job store unavailable during a wait: answering without it")
        return None


def waiting(endpoint: Endpoint) -> Endpoint:
    """A submit route that honours `Prefer: wait` around its own answer."""

    async def route(request: Request) -> Response:
        state = app_state(request)
        # Checked before the submission: a refused header creates nothing.
        seconds = prefer.wait_seconds(request.headers, state.settings.max_wait)
        response = await endpoint(request)
        if seconds is None or response.status_code != 200:
            return response
        if isinstance(response, JobCreated) and seconds == 0:
            # Just created: not ended, nothing read from Chamelaion: there is nothing to add.
            response.headers.update(prefer.applied(seconds))
            return response
        try:
            answer = orjson.loads(bytes(response.body))
        except orjson.JSONDecodeError:
            return response
        if not isinstance(answer, dict):
            return response
        job: Job | None = None
        if isinstance(response, JobCreated):
            request_id = response.request_id  # no need to read it: it waits at once
        else:
            named = answer.get("request_id")
            try:
                job = await state.store.get(named) if isinstance(named, str) else None
            except RedisError:
                return response
            if job is None:
                return response  # not tracked here (nothing to wait on): as it was
            request_id = job.request_id
        if (job is None or not job.ended) and seconds > 0:
            job = await wait_for_end(state, request, request_id, seconds) or job
        if job is not None and job.body is not None:
            answer["request"] = orjson.Fragment(job.body)
        headers = {
            name: value
            for name, value in response.headers.items()
            if name not in ("content-length", "content-type")
        }
        return Response(
            orjson.dumps(answer),
            media_type="application/json",
            headers={**headers, **prefer.applied(seconds)},
        )

    return route
