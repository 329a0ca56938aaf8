"""GET /api/relay/v1/webhook-keys: the ed25519 public keys receivers verify `v1a` with.

Unauthenticated on purpose: a public key is no secret, and receivers fetch it without holding
one of the relay's API keys. Each key is listed with a stable id (derived from the key) and the
time the relay first published it (kept in Redis, so every API process reports the same one).
During a rotation both keys are listed and both sign. A caller with ed25519 secrets of its own
(relay.callers) has its keys listed with its name; the global keys have `caller: null` and
sign the callbacks of every caller without its own.
"""

from __future__ import annotations

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from relay.api.state import app_state
from relay.jobs.events import iso
from relay.redis import keys
from relay.redis.batch import batcher
from relay.redis.clock import redis_now

PATH = "/api/relay/v1/webhook-keys"


async def webhook_keys(request: Request) -> Response:
    state = app_state(request)
    published = [
        (caller, key)
        for caller, signer in state.signers.published()
        for key in signer.public_keys()
    ]
    entries = []
    for caller, key in published:
        created: str | None = None
        try:
            seconds = int(await redis_now(state.redis))
            redis_key = keys.webhook_key(key.key_id)
            _, first = await batcher(state.redis).run(
                [("SET", redis_key, seconds, "NX"), ("GET", redis_key)]
            )
            if first is not None:
                created = iso(int(first))
        except RedisError:
            created = None  # the key is still worth publishing
        entries.append(
            {
                "key_id": key.key_id,
                "algorithm": "ed25519",
                "public_key": key.value,
                "created": created,
                # Whose callbacks it verifies: a caller's own key, or (null) every other's.
                "caller": caller,
            }
        )
    return JSONResponse({"keys": entries}, headers={"cache-control": "public, max-age=300"})
