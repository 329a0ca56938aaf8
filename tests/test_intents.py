"""Intents (relay.jobs.intents) directly on a real Redis: opened, settled and closed whole."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from relay.jobs.intents import Intent, Intents, stale_after
from relay.jobs.store import JobStore
from relay.redis import keys
from relay.settings import Settings


@pytest.fixture
def intents(redis: Redis) -> Intents:
    return Intents(redis, JobStore(redis), Settings.model_validate({}))


async def opened(intents: Intents, reference_id: str | None) -> Intent:
    intent, _ = await intents.open(
        reference_id=reference_id,
        idempotency_key=None,
        callback_url="https://receiver.example/hook",
        events=None,
        metadata=None,
    )
    return intent


@pytest.mark.parametrize("reference_id", [None, "dub-42"])
async def test_settling_an_intent_removes_every_trace(
    redis: Redis, intents: Intents, reference_id: str | None
) -> None:
    # An intent without a reference_id (an upload, say) has no reference index to leave.
    intent = await opened(intents, reference_id)
    assert await redis.exists(keys.intent(intent.id))
    await intents.settle(intent, status=0)
    assert not await redis.exists(keys.intent(intent.id))
    assert await redis.zscore(keys.INTENTS, intent.id) is None
    if reference_id:
        assert await redis.zscore(keys.intents_by_ref(reference_id), intent.id) is None


@pytest.mark.parametrize("reference_id", [None, "dub-43"])
@pytest.mark.parametrize("tracked_before", [False, True])
async def test_tracking_the_job_closes_its_intent_in_the_same_step(
    redis: Redis, intents: Intents, reference_id: str | None, tracked_before: bool
) -> None:
    store = JobStore(redis)
    intent = await opened(intents, reference_id)
    # Tracked meanwhile (adopted by a reconcile, say): the intent is done with all the same.
    if tracked_before:
        assert await store.create("req-1", callback_url=None, reference_id=None, first_poll_in=1)
    created = await store.create(
        "req-1",
        callback_url="https://receiver.example/hook",
        reference_id=reference_id,
        first_poll_in=1,
        intent_id=intent.id,
    )
    assert created is not tracked_before
    assert await redis.exists(keys.job("req-1"))
    assert not await redis.exists(keys.intent(intent.id))
    assert await redis.zscore(keys.INTENTS, intent.id) is None
    if reference_id:
        assert await redis.zscore(keys.intents_by_ref(reference_id), intent.id) is None


@pytest.mark.parametrize("first_look", [None, 3.0])
async def test_an_intent_is_first_due_for_the_reconcile_after_its_first_look(
    redis: Redis, first_look: float | None
) -> None:
    settings = Settings.model_validate(
        {} if first_look is None else {"RELAY_INTENT_FIRST_LOOK": first_look}
    )
    intents = Intents(redis, JobStore(redis), settings)
    intent = await opened(intents, "dub-44")
    due = await redis.zscore(keys.INTENTS, intent.id)
    # By default, once the API can no longer be working on the create.
    assert due == pytest.approx(intent.started + (first_look or stale_after(settings)))
    # What could still be this create's row is judged by that, not by the first look.
    assert intents.stale_after == stale_after(settings)
