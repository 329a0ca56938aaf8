"""A job's events, in order: every status change and every delivery outcome, each with the
job's next `sequence` number (1, 2, 3, ...), the same in its callback, its event stream and
its caller's feed.

The Redis scripts that change a job emit its events themselves (`history.lua`, prepended to
them by `prelude`), so an event is recorded in the same step as the change it tells of, and
sequence numbers have no gaps and never repeat. Each event is appended to the job's history
(`relay:history:{request_id}`, a list as long-lived as the job), filed as a pointer in its
caller's feed (`relay:feed:{caller}`, a stream, trimmed to the job retention) and announced on
the `relay:events` channel, which wakes the API's waiters (relay.api.waiters): pub/sub
rather than keyspace notifications, which need a Redis setting managed services may refuse.

An event as shown (JSON; stored without its request id, and with `"with_body": true` in place of
the job's final body, which is kept once, in the job's hash):
    {"sequence": 3, "request_id": "...", "at": <Redis-clock seconds>, "type": "status",
     "status": "completed", "data": {<the LipsyncRequest, final statuses only>}}
    {"sequence": 4, "request_id": "...", "at": ..., "last": true, "type": "delivery",
     "event": "lipsync.completed", "attempt": 0, "outcome": "delivered", "result": "HTTP 204"}
`last` marks the job's last event: its end when nothing is to be delivered, else its final
event's settled delivery (a redelivery may still add more later).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import orjson
from redis.asyncio import Redis

from relay.jobs.events import iso
from relay.redis import keys
from relay.redis.batch import Call, batcher
from relay.settings import Settings

# The feed's retention unless a store is told the job retention (tests build stores bare).
DEFAULT_RETENTION: float = Settings.model_fields["job_retention"].default

# How a stored event says it shows the job's final body as `data` (history.lua).
WITH_BODY = b'"with_body":true'

# Flags of an announcement on the events channel.
ENDS = 1  # the job ended with this event
LAST = 2  # the job's last event


@cache
def prelude(retention: float = DEFAULT_RETENTION) -> str:
    """history.lua with its header: the keys it writes and the feed's retention (seconds)."""
    header = (
        f"local history_prefix = '{keys.HISTORY_PREFIX}'\n"
        f"local feed_prefix = '{keys.FEED_PREFIX}'\n"
        f"local events_channel = '{keys.EVENTS_CHANNEL}'\n"
        f"local feed_retention = {float(retention)!r}\n"
    )
    return header + resources.files(__package__).joinpath("history.lua").read_text()


@dataclass(frozen=True)
class Announcement:
    """What the events channel says of one event."""

    request_id: str
    caller: str
    sequence: int
    flags: int

    @property
    def ends(self) -> bool:
        return bool(self.flags & ENDS)

    @property
    def last(self) -> bool:
        return bool(self.flags & LAST)

    @classmethod
    def parse(cls, raw: bytes) -> Announcement | None:
        """None for a message that is not one (the channel is not the relay's alone)."""
        try:
            request_id, caller, sequence, flags = orjson.loads(raw)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            return None
        if not (isinstance(request_id, str) and isinstance(caller, str)):
            return None
        if not (isinstance(sequence, int) and isinstance(flags, int)):
            return None
        return cls(request_id, caller, sequence, flags)


def shown(raw: bytes, request_id: str, body: bytes | None) -> dict[str, Any]:
    """A stored event as the API shows it: with its job's request id, its time in ISO 8601
    (UTC), and the job's final body as `data` where it is marked to carry it."""
    stored: dict[str, Any] = orjson.loads(raw)
    event: dict[str, Any] = {"sequence": stored.pop("sequence", 0), "request_id": request_id}
    at = stored.pop("at", None)
    event["at"] = iso(at) if isinstance(at, int | float) else at
    with_body = stored.pop("with_body", False)
    event.update(stored)
    if with_body:
        event["data"] = orjson.Fragment(body) if body else None
    return event


@dataclass(frozen=True)
class FeedPage:
    events: list[dict[str, Any]]
    cursor: str  # where the next read starts: the last entry's stream id, else the one given


class History:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def after(self, request_id: str, sequence: int) -> list[dict[str, Any]]:
        """The job's events numbered above `sequence`, oldest first."""
        raw, body = await batcher(self.redis).run(
            [
                ("LRANGE", keys.history(request_id), sequence, -1),
                ("HGET", keys.job(request_id), "body"),
            ]
        )
        return [shown(item, request_id, body) for item in raw]

    async def feed(self, caller: str, *, after: str, count: int) -> FeedPage:
        """Up to `count` of `caller`'s events filed after the stream id `after` ("0": from the
        oldest kept), oldest first.

        A pointer whose job's history is gone (the job expired) is skipped; the cursor still
        moves past it.
        """
        start = "-" if after == "0" else f"({after}"
        (entries,) = await batcher(self.redis).run(
            [("XRANGE", keys.feed(caller), start, "+", "COUNT", count)]
        )
        if not entries:
            return FeedPage([], after)
        jobs = [fields[b"r"].decode() for _, fields in entries]
        calls: list[Call] = [
            ("LINDEX", keys.history(request_id), int(fields[b"s"]) - 1)
            for request_id, (_, fields) in zip(jobs, entries, strict=True)
        ]
        found = await batcher(self.redis).run(calls)
        # The final bodies, for the events that show one (one read each, in one round trip).
        ended = sorted(
            {job for job, raw in zip(jobs, found, strict=True) if raw and WITH_BODY in raw}
        )
        bodies: dict[str, bytes | None] = {}
        if ended:
            read = await batcher(self.redis).run([("HGET", keys.job(job), "body") for job in ended])
            bodies = dict(zip(ended, read, strict=True))
        events = [
            shown(raw, job, bodies.get(job)) for job, raw in zip(jobs, found, strict=True) if raw
        ]
        return FeedPage(events, entries[-1][0].decode())
