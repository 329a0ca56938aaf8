"""`Idempotency-Key` on the submit routes: the same key and body answer once, whatever retries.

Scoped per caller (the key is stored under a digest of the caller's API key, so one caller can
neither read nor block another's) and kept RELAY_IDEMPOTENCY_TTL (24 h). The same key with the
same body replays the first answer without a second upstream job; with another body it is 422;
a retry while the first is still in flight is 409. Answers that say "try again" (429, 5xx) are
not kept: the key is released so the retry runs. Answers that say "do not retry"
(`x-should-retry: false`: the job may exist, or exists but is not confirmed) are kept. When
the outcome of the upstream create is still being settled (relay.jobs.intents: the workers'
reconcile looks for the job), the key stays held until the reconcile answers it: with the job
it found, or released when none was created. A request that dies in flight holds its key for
the upstream timeout plus a minute, then the key is free again (its intent, if the upstream
call had begun, settles the key too, when it still holds it).

The route learns the Redis key of the record it holds from `scope["state"]["idempotency_key"]`,
so its intent can name it.

What is kept is small, whatever the request: a fingerprint, a status and an answer of at most
KEPT_BODY_LIMIT bytes (a longer one is kept reduced: its error message, or its request id).
And a caller holds at most RELAY_IDEMPOTENCY_MAX_KEYS records at once; a new key beyond that
is 429 (a key already held still replays). Before both, a caller sending 1 MB bodies of unknown
fields under fresh keys kept a 5 MB answer per request for a day, and filled Redis for everyone.

JSON submits are fingerprinted by their body's SHA-256. Uploads are streamed and never held,
so their fingerprint is what is known up front, the declared length (a retry picks a new
multipart boundary, so the bytes differ anyway): an upload is replayed by key only once the
first has completed.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Awaitable, Callable

import orjson
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message

from relay.api.auth import request_caller
from relay.api.body import read_body
from relay.api.responses import error_content
from relay.api.state import AppState, app_state
from relay.api.submit import OutcomeUnknown
from relay.errors import ApiError
from relay.metrics import IDEMPOTENCY_KEYS_REFUSED
from relay.redis import keys, scripts
from relay.redis.batch import batcher

HEADER = "idempotency-key"
MAX_KEY_LENGTH = 255
# Answers worth replaying: the job was accepted, or the request itself is wrong.
KEEP = range(200, 500)
RETRYABLE = (408, 409, 429)
# The longest answer kept as it was. A create's answer is ~80 bytes and a refusal's a few
# hundred (details are capped, relay.api.responses); 1 KiB also keeps the record a compact
# listpack under the chart's Redis (hash-max-listpack-value 1024).
KEPT_BODY_LIMIT = 1024
# Texts of a reduced answer are cut to this many characters (4 bytes each at most in UTF-8).
KEPT_TEXT_CHARS = 160

Endpoint = Callable[[Request], Awaitable[Response]]


def _valid_key(value: str) -> str:
    if not 1 <= len(value) <= MAX_KEY_LENGTH or not value.isascii() or not value.isprintable():
        raise ApiError(
            400, f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters"
        )
    return value


def _replaying(raw: bytes) -> Callable[[], Awaitable[Message]]:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    return receive


def idempotent(endpoint: Endpoint, *, buffered: bool) -> Endpoint:
    """`endpoint` guarded by Idempotency-Key; `buffered`: the body is small enough to hash."""

    async def guarded(request: Request) -> Response:
        header = request.headers.get(HEADER)
        if header is None:
            return await endpoint(request)
        state = app_state(request)
        if buffered:
            raw = await read_body(request, state.settings.max_body_bytes)
            fingerprint = hashlib.sha256(raw).hexdigest()
            request = Request(request.scope, _replaying(raw))
        else:
            # A retry of an upload picks a new multipart boundary: only the length can tell.
            fingerprint = "length:" + request.headers.get("content-length", "chunked")
        # Per caller: two callers' keys never meet (every key of one caller is the same caller).
        caller = request_caller(request).name
        redis_key = keys.idempotency(caller, request.url.path, _valid_key(header))
        count_key = keys.idempotency_held(caller)
        held = await _claim(state, redis_key, count_key, fingerprint)
        if held is not None:
            return held
        request.scope["state"]["idempotency_key"] = redis_key
        try:
            response = await endpoint(request)
        except ApiError as exc:
            final = exc.headers.get("x-should-retry") == "false" or (
                exc.status_code in KEEP and exc.status_code not in RETRYABLE
            )
            if isinstance(exc, OutcomeUnknown) and exc.pending:
                pass  # the reconcile answers the key once it knows (relay.jobs.intents)
            elif final:
                body = orjson.dumps(error_content(exc))
                await _keep(state, redis_key, exc.status_code, "application/json", body)
            else:
                await _release(state, redis_key, count_key)
            raise
        except BaseException:
            # Cut off (a disconnect, a shutdown past its grace) perhaps mid-create: while the
            # create's intent is open, the key stays held for the reconcile to answer.
            await _release(state, redis_key, count_key, unless_intent_open=True)
            raise
        if response.status_code in KEEP and response.status_code not in RETRYABLE:
            await _keep(
                state,
                redis_key,
                response.status_code,
                response.media_type or "application/json",
                bytes(response.body),
            )
        else:
            await _release(state, redis_key, count_key)
        return response

    return guarded


def kept_answer(body: bytes) -> bytes:
    """What is kept of an answer to replay it: the answer itself up to KEPT_BODY_LIMIT bytes,
    else its gist (the error message and the first detail's code, or the created job's
    request_id), with texts cut to KEPT_TEXT_CHARS."""
    if len(body) <= KEPT_BODY_LIMIT:
        return body
    try:
        content = orjson.loads(body)
    except orjson.JSONDecodeError:
        content = None
    if not isinstance(content, dict):
        content = {}
    kept: dict[str, object] = {}
    for name in ("error", "status", "request_id"):
        value = content.get(name)
        if isinstance(value, str):
            kept[name] = value[:KEPT_TEXT_CHARS]
    details = content.get("details")
    if isinstance(details, list) and details:
        first = details[0]
        code = first.get("code") if isinstance(first, dict) else None
        codes = [{"code": code[:KEPT_TEXT_CHARS]}] if isinstance(code, str) else []
        if codes:
            kept["details"] = codes
        omitted = content.get("details_omitted")
        kept["details_omitted"] = (
            len(details) - len(codes) + (omitted if isinstance(omitted, int) else 0)
        )
    if not kept:
        kept["error"] = "the first answer to this Idempotency-Key was too long to keep"
    return orjson.dumps(kept)


async def _claim(
    state: AppState, redis_key: str, count_key: str, fingerprint: str
) -> Response | None:
    settings = state.settings
    in_flight_ttl = int(settings.upstream_timeout) + 60
    # A key counts from its claim until its record is surely gone: kept RELAY_IDEMPOTENCY_TTL
    # after at most the longest in-flight hold (an open intent's).
    counted_for = int(settings.idempotency_ttl + state.intents.ttl)
    limit = settings.idempotency_max_keys
    script = scripts.register(state.redis, __name__)
    try:
        reply = await script(
            keys=[redis_key, count_key], args=[fingerprint, in_flight_ttl, limit, counted_for]
        )
    except RedisError:
        raise ApiError(503, "the relay's job store is unavailable; try again") from None
    outcome = reply[0].decode()
    if outcome == "new":
        return None
    if outcome == "full":
        IDEMPOTENCY_KEYS_REFUSED.inc()
        raise ApiError(
            429,
            f"this caller already holds {limit} Idempotency-Keys, the most the relay keeps for "
            "one caller (RELAY_IDEMPOTENCY_MAX_KEYS; each is kept RELAY_IDEMPOTENCY_TTL); "
            "retry later, or submit without a new key",
            headers={"retry-after": str(max(1, int(reply[1])))},
        )
    if outcome == "conflict":
        raise ApiError(422, "Idempotency-Key was already used with a different request")
    if outcome == "in_flight":
        raise ApiError(
            409,
            "a request with this Idempotency-Key is still in progress; retry later",
            headers={"retry-after": "1"},
        )
    status, content_type, body = int(reply[1]), reply[2].decode(), bytes(reply[3])
    return Response(body, status, media_type=content_type, headers={"idempotent-replayed": "true"})


async def _keep(
    state: AppState, redis_key: str, status: int, content_type: str, body: bytes
) -> None:
    answer = ("state", "done", "status", status, "content_type", content_type)
    # On a Redis error the answer still goes out; a retry then waits out the in-flight hold.
    with contextlib.suppress(RedisError):
        await batcher(state.redis).run(
            [
                ("HSET", redis_key, *answer, "body", kept_answer(body)),
                ("EXPIRE", redis_key, int(state.settings.idempotency_ttl)),
            ],
            atomic=True,
        )


async def _release(
    state: AppState, redis_key: str, count_key: str, *, unless_intent_open: bool = False
) -> None:
    with contextlib.suppress(RedisError):
        if unless_intent_open:
            (intent_id,) = await batcher(state.redis).run([("HGET", redis_key, "intent")])
            intent = intent_id and keys.intent(intent_id.decode())
            if intent and (await batcher(state.redis).run([("EXISTS", intent)]))[0]:
                return
        # A key the reconcile releases instead (relay.jobs.intents) stays counted until its
        # time runs out: rare, and it errs on the safe side.
        await batcher(state.redis).run(
            [("DEL", redis_key), ("ZREM", count_key, redis_key)], atomic=True
        )
