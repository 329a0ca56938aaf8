"""A caller's event feed: every event of its jobs after a cursor, long-polled.

GET /api/relay/v1/events?after=<cursor>&wait=N&limit=M

The events are those its jobs' scripts filed in its feed (relay.jobs.history:
`relay:feed:{caller}`, a Redis stream of pointers to each job's history), oldest first, with the
cursor to ask from next: the stream id of the last one, a position that survives restarts of
the API and, with AOF, of Redis. With `wait`, a read that finds nothing new waits for the
caller's next event (announced on `relay:events`, relay.api.waiters), up to N seconds: never
an upstream call.
"""

from __future__ import annotations

import asyncio
import re

import orjson
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from relay.api.state import app_state
from relay.errors import ApiError
from relay.jobs.history import FeedPage

PAGE = 100
MAX_LIMIT = 1000
# A cursor: a Redis stream id (milliseconds-sequence), or 0 for the start.
CURSOR = re.compile(r"0|[0-9]{1,15}-[0-9]{1,19}")


def _whole(value: str, name: str, low: int, high: int) -> int:
    if not (value.isascii() and value.isdigit() and len(value) <= 9) or not (
        low <= int(value) <= high
    ):
        raise ApiError(400, f"{name} must be a whole number from {low} to {high}")
    return int(value)


async def feed(request: Request) -> Response:
    state = app_state(request)
    params = request.query_params
    after = params.get("after", "0")
    if not CURSOR.fullmatch(after):
        raise ApiError(400, "after must be 0 or a next_cursor the feed gave")
    wait = _whole(params.get("wait", "0"), "wait", 0, state.settings.max_wait)
    limit = _whole(params.get("limit", str(PAGE)), "limit", 1, MAX_LIMIT)
    # The name the auth middleware accepted the request for: a caller reads its own feed only.
    caller: str = request.scope["state"]["caller_id"]
    history, waiters = state.history, state.waiters

    async def read() -> FeedPage:
        return await history.feed(caller, after=after, count=limit)

    try:
        page = await read()
        if page.cursor == after and wait > 0 and not waiters.draining:
            deadline = asyncio.get_running_loop().time() + wait
            with waiters.watch("feed", caller=caller) as waiter:
                async with waiters.listening(waiter, request):
                    # Read again once registered: an event since the first read is not missed.
                    page = await read()
                    while page.cursor == after and not (waiter.hung_up or waiters.draining):
                        remaining = deadline - asyncio.get_running_loop().time()
                        if remaining <= 0:
                            break
                        if await waiter.next(remaining):
                            page = await read()
    except RedisError:
        raise ApiError(503, "the relay's job store is unavailable; try again") from None
    # orjson: an event's data is the job's body as stored, passed through.
    return Response(
        orjson.dumps({"events": page.events, "next_cursor": page.cursor}),
        media_type="application/json",
    )
