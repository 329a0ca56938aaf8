"""The intent reconcile: settle submissions whose upstream outcome nobody recorded.

An intent (relay.jobs.intents) outlives its API request when the API handed it over (its
answer was lost and the job was not found at once), when the API process died mid-create, or
when the tracking write failed. Every RELAY_INTENT_RECONCILE_INTERVAL one worker (a lease key
decides which) takes the intents that are due and looks for each one's job by reference_id:
- exactly one row it can own and no rival intent: the job is tracked (polled, called back)
  and the intent's Idempotency-Key, if any, answers with it from then on;
- nothing (yet), or a rival still in flight: looked at again later, each time twice as late;
- once RELAY_INTENT_WINDOW has passed since the submission: dropped, with a log line and
  `relay_submit_intents_total{outcome}`: `not_found` (its Idempotency-Key is released, so a
  retry may create the job), `dropped_ambiguous` (several rows could be it: they are named in
  the log, and the key answers with that error), `dropped_unfindable` (no reference_id to
  look by: the job, if any, runs untracked).
Every list page a lookup reads (up to relay.jobs.intents.LOOKUP_PAGES of them) spends one slot
of the shared upstream budget, booked ahead of polls as a sweep's page is: the lookups go
through the worker's client with a budget of their own (`StatusReadBudget`). A 429 one meets
pauses everyone's calls; an intent whose lookup a pause stops is looked up the round after.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

import orjson
from redis.asyncio import Redis

from relay.errors import UpstreamError
from relay.jobs.intents import Intent, Intents
from relay.jobs.schedule import PollSchedule, StatusReadBudget
from relay.lifecycle import Service
from relay.metrics import INTENTS
from relay.redis import keys
from relay.redis.leased import run_leased
from relay.upstream import BudgetRefused, Upstream

log = logging.getLogger(__name__)

# Candidate request ids an ambiguous intent's answer lists at most.
LISTED_CANDIDATES = 5

BATCH = 100
MAX_SPACING = 300.0  # seconds: the longest wait between two lookups of one intent


class Reconciler(Service):
    name = "reconcile"

    def __init__(
        self,
        redis: Redis,
        intents: Intents,
        schedule: PollSchedule,
        upstream: Upstream,
        *,
        interval: float,
        lookup_timeout: float,
    ) -> None:
        self.redis = redis
        self.intents = intents
        self.upstream = upstream.with_budget(
            StatusReadBudget(schedule, met_by="the intent reconcile")
        )
        self.interval = interval
        self.lookup_timeout = lookup_timeout
        self._token = secrets.token_hex(8)

    async def run(self, stop: asyncio.Event) -> None:
        """Reconcile every `interval` while this worker holds the lease, until `stop`."""
        await run_leased(
            self.redis,
            lease_key=keys.RECONCILE_LEASE,
            token=self._token,
            interval=self.interval,
            once=lambda: self.reconcile_once(stop),
            stop=stop,
            what="intent reconcile",
        )

    async def reconcile_once(self, stop: asyncio.Event | None = None) -> int:
        """Settle what can be settled among the due intents; returns how many were."""
        due, now = await self.intents.due(BATCH)
        settled = 0
        for intent in due:
            if stop is not None and stop.is_set():
                break
            try:
                if await self._one(intent, now):
                    settled += 1
            except BudgetRefused:
                continue  # a 429 pause: looked up next round, and not counted as a look
        return settled

    async def _one(self, intent: Intent, now: float) -> bool:
        expired = now - intent.started >= self.intents.window
        if intent.reference_id is None:
            INTENTS.labels("dropped_unfindable").inc()
            log.warning(
                "a submission without reference_id lost its upstream outcome (its API process "
                "died, or could not record the job): if Chamelaion created the job, it runs "
                "untracked, with no callback",
                extra={"intent": intent.id},
            )
            await self.intents.settle(intent, status=0)
            return True
        try:
            found = await self.intents.look(intent, self.upstream, timeout=self.lookup_timeout)
        except BudgetRefused:
            raise
        except UpstreamError as exc:
            log.warning("could not look for a lost submission's job: %s", exc.message)
            await self._later(intent)
            return False
        if found.adoptable and await self.intents.adopt(intent, found.adoptable):
            INTENTS.labels("reconciled").inc()
            log.warning(
                "tracking a job whose creation was not recorded",
                extra={"request_id": found.adoptable, "intent": intent.id},
            )
            return True
        if not expired:
            await self._later(intent)
            return False
        if found.candidates:
            INTENTS.labels("dropped_ambiguous").inc()
            log.error(
                "a lost submission's job cannot be told apart from others with its reference_id;"
                " none is tracked",
                extra={"intent": intent.id, "request_ids": found.candidates},
            )
            body = orjson.dumps(
                {
                    "error": "the job's outcome was lost and Chamelaion holds several requests "
                    "with its reference_id that it could be; none is tracked",
                    "details": [
                        {
                            "code": "upstream_outcome_ambiguous",
                            # Kept as the Idempotency-Key's answer for a day: a few ids, not
                            # the up to 1,000 a lookup reads.
                            "request_ids": found.candidates[:LISTED_CANDIDATES],
                            "request_ids_omitted": max(
                                0, len(found.candidates) - LISTED_CANDIDATES
                            ),
                        }
                    ],
                }
            )
            await self.intents.settle(intent, status=502, body=body)
        else:
            INTENTS.labels("not_found").inc()
            log.info(
                "no job found for a lost submission within the window: it was not created",
                extra={"intent": intent.id},
            )
            await self.intents.settle(intent, status=0)
        return True

    async def _later(self, intent: Intent) -> None:
        await self.intents.postpone(
            intent, after=min(self.interval * 2 ** (intent.looks + 1), MAX_SPACING)
        )
