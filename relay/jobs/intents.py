"""Submission intents: what the API is about to ask Chamelaion to create, written first.

Chamelaion has no idempotency key, and the answer to a create can be lost after the job exists:
a timeout, a connection reset after the request was sent, a 5xx sent after creating, an API
process killed mid-call, a Redis that refuses the tracking write. So before every upstream
create the API writes an intent (what was asked: reference_id, the Idempotency-Key record,
callback, events, metadata; and when, on the Redis clock), and removes it once the job is
tracked. An intent left over is a create whose outcome nobody recorded, and the job it may
have created is looked for by its reference_id: Chamelaion's list filters by exact
reference_id (`look`).

reference_id is not unique upstream, so a row is adopted only when it can be this submission's
and no other's:
- created no earlier than the intent was opened (less CLOCK_MARGIN: created_at has whole
  seconds, and Chamelaion's clock is not Redis's) and no later than the create could have run;
- not tracked (adopting is tracking, and store.create.lua tracks an id once, so a row is never
  adopted twice);
- the only such row, while no other open intent with that reference_id is left (another
  submission in flight could own it; one with the same Idempotency-Key is the same
  submission, so it does not count).
Anything else cannot be told apart, and the relay says so rather than guess.

The API resolves its own lost answers at once (relay.api.submit). Intents it left to the
reconcile, and those of API processes that died or could not record their job, are reconciled
by one worker (relay.jobs.reconcile): adopted when found (the job is then polled and called
back like any other), dropped once RELAY_INTENT_WINDOW has passed with nothing to adopt.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from relay.errors import UpstreamError
from relay.jobs.store import JobStore
from relay.jobs.sweep import CLOCK_MARGIN, created_time
from relay.redis import keys, scripts
from relay.redis.batch import Call, batcher
from relay.redis.clock import redis_now
from relay.settings import Settings
from relay.upstream import Upstream, check, json_object

LIST_PATH = "v1/lipsync/requests"
LOOKUP_PAGE = 100
LOOKUP_PAGES = 10  # at most this many rows x pages with one reference_id are read
MAX_ID_LENGTH = 256


def lookup_timeout(settings: Settings) -> float:
    return min(settings.upstream_timeout, 10.0)


def stale_after(settings: Settings) -> float:
    """How long after opening an intent its API request may still be working on it.

    An upload's intent is opened before its last bytes: writing them and the answer each get
    RELAY_UPSTREAM_TIMEOUT; then come a lookup (with its budget wait) and the tracking write.
    A worker looking earlier does no harm (whoever tracks first wins, once), it only looks
    for a job that may not be there yet.
    """
    return (
        2 * settings.upstream_timeout
        + lookup_timeout(settings)
        + 2 * settings.api_budget_wait
        + 2 * settings.redis_timeout
        + 5.0
    )


@dataclass(frozen=True)
class Intent:
    id: str
    started: float  # Redis clock, when the intent was written
    reference_id: str | None
    idempotency_key: str | None  # the Redis key of the Idempotency-Key record it holds
    callback_url: str | None
    events: tuple[str, ...] | None
    metadata: bytes | None
    looks: int = 0  # reconcile lookups that settled nothing so far
    caller: str | None = None  # whose submission it is: its job, once adopted, is theirs


@dataclass(frozen=True)
class Found:
    """What a lookup found: untracked rows this intent can have created, and how many other
    open intents could own them."""

    candidates: list[str]
    rivals: int

    @property
    def adoptable(self) -> str | None:
        return self.candidates[0] if len(self.candidates) == 1 and not self.rivals else None


def _decode(intent_id: str, raw: dict[bytes, bytes]) -> Intent:
    def text(name: str) -> str | None:
        value = raw.get(name.encode())
        return value.decode() if value else None

    events = text("events")
    return Intent(
        id=intent_id,
        started=float(raw[b"started"]),
        reference_id=text("reference_id"),
        idempotency_key=text("idem"),
        callback_url=text("callback_url"),
        events=tuple(events.split(",")) if events else None,
        metadata=raw.get(b"metadata") or None,
        looks=int(raw.get(b"looks") or 0),
        caller=text("caller"),
    )


def created_answer(request_id: str) -> bytes:
    """Chamelaion's own answer to a create, for a job found instead of heard of."""
    return orjson.dumps({"status": "success", "request_id": request_id})


class Intents:
    def __init__(self, redis: Redis, store: JobStore, settings: Settings) -> None:
        self.redis = redis
        self.store = store
        self.stale_after = stale_after(settings)
        self.first_look = settings.intent_first_look or self.stale_after
        self.window = settings.intent_window
        # How long an intent's record lives at most: a safety net only, the reconcile removes
        # every intent well before.
        self.ttl = int(self.stale_after + self.window + 3600)
        self.idempotency_ttl = settings.idempotency_ttl
        self.poll_in = settings.poll_min_interval
        self._open = scripts.register(redis, __name__, "open")
        self._leave = scripts.register(redis, __name__, "leave")
        self._settle = scripts.register(redis, __name__, "settle")

    def _keys(self, intent_id: str, reference_id: str | None, idem: str | None) -> list[str]:
        own = keys.intent(intent_id)
        return [
            own,
            keys.INTENTS,
            keys.intents_by_ref(reference_id) if reference_id else own,
            idem or own,
        ]

    async def open(
        self,
        *,
        reference_id: str | None,
        idempotency_key: str | None,
        callback_url: str | None,
        events: Sequence[str] | None,
        metadata: bytes | None,
        caller: str | None = None,
        along: Sequence[Call] = (),
    ) -> tuple[Intent, list[Any]]:
        """Write the intent; with it, in the same round trip, the `along` calls (the API's
        budget booking), whose results (or errors) come back beside it."""
        intent_id = secrets.token_hex(16)
        opening = self._open.call(
            keys=self._keys(intent_id, reference_id, idempotency_key),
            args=[
                intent_id,
                reference_id or "",
                idempotency_key or "",
                callback_url or "",
                ",".join(events or ()),
                metadata or b"",
                self.first_look,
                self.ttl,
                caller or "",
            ],
        )
        started, *results = await batcher(self.redis).run([opening, *along], return_exceptions=True)
        if isinstance(started, Exception):
            raise started
        intent = Intent(
            intent_id,
            float(started),
            reference_id,
            idempotency_key,
            callback_url,
            tuple(events) if events else None,
            metadata,
            caller=caller,
        )
        return intent, results

    async def close(self, intent: Intent) -> None:
        """The job is tracked (or surely not created): the intent is done with."""
        # Not one transaction: joined with other calls in one round trip instead. The record
        # goes first: index entries a close cut off half way leaves behind point at nothing,
        # and their readers (`due`, `_rivals`) drop such entries.
        calls: list[Call] = [("DEL", keys.intent(intent.id)), ("ZREM", keys.INTENTS, intent.id)]
        if intent.reference_id:
            calls.append(("ZREM", keys.intents_by_ref(intent.reference_id), intent.id))
        await batcher(self.redis).run(calls)

    async def leave_to_reconcile(self, intent: Intent, *, after: float) -> None:
        """Leave the intent to the reconcile, first looked at in `after` seconds; its
        Idempotency-Key stays held until the reconcile settles it."""
        await self._leave(
            keys=[
                keys.intent(intent.id),
                keys.INTENTS,
                intent.idempotency_key or keys.intent(intent.id),
            ],
            args=[intent.id, after, self.window + self.stale_after],
        )

    async def postpone(self, intent: Intent, *, after: float) -> None:
        now = await redis_now(self.redis)
        await batcher(self.redis).run(
            [
                ("HINCRBY", keys.intent(intent.id), "looks", 1),
                # Should the intent have been closed meanwhile, the count recreated a stray
                # hash: it expires like any intent's safety net.
                ("EXPIRE", keys.intent(intent.id), self.ttl),
                ("ZADD", keys.INTENTS, "XX", now + after, intent.id),
            ],
            atomic=True,
        )

    async def settle(self, intent: Intent, *, status: int, body: bytes = b"") -> None:
        """Close the intent and answer its Idempotency-Key (status 0: release the key)."""
        await self._settle(
            keys=self._keys(intent.id, intent.reference_id, intent.idempotency_key),
            args=[intent.id, status, body, int(self.idempotency_ttl)],
        )

    async def due(self, limit: int) -> tuple[list[Intent], float]:
        """Intents a worker should look at now (oldest due first), and the Redis clock."""
        now = await redis_now(self.redis)
        (due,) = await batcher(self.redis).run(
            [("ZRANGEBYSCORE", keys.INTENTS, "-inf", now, "LIMIT", 0, limit)]
        )
        ids = [raw.decode() for raw in due]
        if not ids:
            return [], now
        raws = await batcher(self.redis).run([("HGETALL", keys.intent(i)) for i in ids])
        found = [_decode(i, raw) for i, raw in zip(ids, raws, strict=True) if raw]
        gone = [i for i, raw in zip(ids, raws, strict=True) if not raw]
        if gone:
            await batcher(self.redis).run([("ZREM", keys.INTENTS, *gone)])
        return found, now

    async def look(self, intent: Intent, upstream: Upstream, *, timeout: float) -> Found:
        """Ask Chamelaion for the requests with this intent's reference_id; UpstreamError
        when it cannot be asked. Every page read is one call of `upstream`, so it spends
        whatever budget that client carries (the API's, or the reconcile's)."""
        assert intent.reference_id is not None
        earliest = intent.started - CLOCK_MARGIN
        latest = intent.started + self.stale_after + CLOCK_MARGIN
        ids: list[str] = []
        for row in await self._rows(upstream, intent.reference_id, timeout):
            request_id = row.get("id")
            if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_ID_LENGTH:
                continue
            if row.get("reference_id") != intent.reference_id or request_id in ids:
                continue
            created = created_time(row.get("created_at"))
            # A row without a usable time may be this one: counted, so it makes a doubt.
            if created is None or earliest <= created <= latest:
                ids.append(request_id)
        tracked = await self.store.get_many(ids) if ids else []
        candidates = [rid for rid, job in zip(ids, tracked, strict=True) if job is None]
        return Found(candidates, await self._rivals(intent))

    async def _rows(
        self, upstream: Upstream, reference_id: str, timeout: float
    ) -> list[dict[str, object]]:
        rows: list[dict[str, object]] = []
        for _ in range(LOOKUP_PAGES):
            response = check(
                await upstream.request(
                    "GET",
                    LIST_PATH,
                    params={
                        "reference_id": reference_id,
                        "limit": str(LOOKUP_PAGE),
                        "offset": str(len(rows)),
                    },
                    timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                )
            )
            body = json_object(response.content)
            data = body.get("data") if body is not None else None
            if body is None or not isinstance(data, list):
                raise UpstreamError(502, "Chamelaion's list of requests is not a list")
            page = [row for row in data if isinstance(row, dict)]
            rows += page
            pagination = body.get("pagination")
            total = pagination.get("total") if isinstance(pagination, dict) else None
            if not page or not isinstance(total, int) or len(rows) >= total:
                break
        return rows

    async def open_for(self, reference_id: str) -> bool:
        """Whether a submission with this reference_id is still open: its job, once found, is
        that submission's, so nothing else may take a job with it meanwhile (a watch)."""
        index = keys.intents_by_ref(reference_id)
        (raw,) = await batcher(self.redis).run([("ZRANGE", index, 0, -1)])
        members = [member.decode() for member in raw]
        if not members:
            return False
        live = await batcher(self.redis).run([("EXISTS", keys.intent(m)) for m in members])
        return any(live)

    async def _rivals(self, intent: Intent) -> int:
        """Other open intents with this reference_id, not of the same Idempotency-Key."""
        assert intent.reference_id is not None
        index = keys.intents_by_ref(intent.reference_id)
        (raw,) = await batcher(self.redis).run([("ZRANGE", index, 0, -1)])
        others = [m.decode() for m in raw if m.decode() != intent.id]
        if not others:
            return 0
        replies = await batcher(self.redis).run(
            [("HMGET", keys.intent(other), "started", "idem") for other in others]
        )
        rivals, gone = 0, []
        for other, (started, idem) in zip(others, replies, strict=True):
            if started is None:
                gone.append(other)  # expired without being closed
            elif not (intent.idempotency_key and idem and idem.decode() == intent.idempotency_key):
                rivals += 1
        if gone:
            await batcher(self.redis).run([("ZREM", index, *gone)])
        return rivals

    async def adopt(self, intent: Intent, request_id: str) -> bool:
        """Track `request_id` as this intent's job and settle the intent; False when it is
        tracked already (someone else got there first: nothing changes)."""
        created = await self.store.create(
            request_id,
            callback_url=intent.callback_url,
            reference_id=intent.reference_id,
            first_poll_in=self.poll_in,
            events=intent.events,
            metadata=intent.metadata,
            caller=intent.caller,
        )
        if created:
            # Left over on a Redis error, the intent is dropped later: its job is tracked.
            with contextlib.suppress(RedisError):
                await self.settle(intent, status=200, body=created_answer(request_id))
        return created
