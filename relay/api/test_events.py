"""POST /api/relay/v1/test-events: send a signed `relay.test` event to a URL now.

For a team checking its endpoint before going live: the URL passes the same network policy as
a callback, the event is signed like every callback, and the answer says what the receiver did
(status, time taken) or what kind of failure it met. Never what the receiver answered: any
caller could then read whatever internal service the network policy lets callbacks reach. A
caller key sends at most RELAY_TEST_EVENTS_PER_MINUTE (429 beyond), so outcomes and timings
cannot map the network at any useful speed either.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from relay.api.auth import request_caller
from relay.api.body import read_body
from relay.api.models import CallbackUrl
from relay.api.state import AppState, app_state
from relay.api.steering_limits import TEST_EVENT, SteeringLimits, allowance
from relay.api.submit import check_callback_url, validation_error
from relay.delivery.failure import failure_class
from relay.errors import ApiError
from relay.jobs.events import build_event
from relay.upstream import USER_AGENT

log = logging.getLogger(__name__)

PATH = "/api/relay/v1/test-events"


class TestEventRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    url: CallbackUrl


async def send_test_event(request: Request) -> Response:
    state = app_state(request)
    raw = await read_body(request, state.settings.max_body_bytes)
    try:
        wanted = TestEventRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_error(exc) from None
    caller = request_caller(request)
    # Signed as the caller's callbacks are: with its own secrets when it has some.
    signer = state.signers.signer(caller.name)
    if signer is None:
        raise ApiError(503, "this API process has no RELAY_WEBHOOK_SECRETS to sign with")
    await _count(state, caller.name)
    await check_callback_url(state, wanted.url, caller)
    log.info("test event", extra={"caller": caller.name})
    webhook_id = "msg_" + uuid.uuid4().hex
    event = build_event("relay.test", {"message": "a test event from chamelaion-relay"})
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        **signer.headers(webhook_id, event),
    }
    started = time.monotonic()
    result: dict[str, object] = {"webhook_id": webhook_id}
    try:
        async with (
            asyncio.timeout(state.settings.delivery_timeout),
            state.callback_client.post(wanted.url, event, headers) as response,
        ):
            # The answer's body is never read: its status is all a caller learns.
            result |= {
                "delivered": 200 <= response.status_code < 300,
                "status": response.status_code,
                "error": None,
            }
    except (httpx.HTTPError, TimeoutError, OSError) as exc:
        result |= {"delivered": False, "status": None, "error": failure_class(exc)}
    result["duration_ms"] = round((time.monotonic() - started) * 1000, 1)
    return JSONResponse(result)


async def _count(state: AppState, caller: str) -> None:
    """Count a test event against the caller's minute; 429 past its allowance."""
    limits = SteeringLimits(state.redis)
    await limits.count(allowance(state.settings, TEST_EVENT), caller)
