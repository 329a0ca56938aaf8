"""Intents (relay.jobs.intents) directly on a real Redis: opened, settled and closed whole."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from relay import keys
from relay.jobs.intents import Intents
from relay.jobs.store import JobStore
from relay.settings import Settings


@pytest.fixture
def intents(redis: Redis) -> Intents:
    return Intents(redis, JobStore(redis), Settings.model_validate({}))


@pytest.mark.parametrize("reference_id", [None, "dub-42"])
async def test_settling_an_intent_removes_every_trace(
    redis: Redis, intents: Intents, reference_id: str | None
) -> None:
    # An intent without a reference_id (an upload, say) has no reference index to leave.
    intent = await intents.open(
        reference_id=reference_id,
        idempotency_key=None,
        callback_url="https://receiver.example/hook",
        events=None,
        metadata=None,
    )
    assert await redis.exists(keys.intent(intent.id))
    await intents.settle(intent, status=0)
    assert not await redis.exists(keys.intent(intent.id))
    assert await redis.zscore(keys.INTENTS, intent.id) is None
    if reference_id:
        assert await redis.zscore(keys.intents_by_ref(reference_id), intent.id) is None
