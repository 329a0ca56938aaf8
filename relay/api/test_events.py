"""POST /api/relay/v1/test-events: send a signed `relay.test` event to a URL now.

For a team checking its endpoint before going live: the URL passes the same network policy as
a callback, the event is signed like every callback, and the answer says what the receiver did
(status, time taken, the start of its reply) or what kind of failure it met.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from relay.api.body import read_body
from relay.api.models import CallbackUrl
from relay.api.state import app_state
from relay.api.submit import check_callback_url, validation_error
from relay.delivery.deliverer import read_excerpt
from relay.delivery.failure import failure_class
from relay.errors import ApiError
from relay.jobs.events import build_event
from relay.upstream import USER_AGENT

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
    if state.signer is None:
        raise ApiError(503, "this API process has no RELAY_WEBHOOK_SECRETS to sign with")
    await check_callback_url(state, wanted.url)
    webhook_id = "msg_" + uuid.uuid4().hex
    event = build_event("relay.test", {"message": "a test event from chamelaion-relay"})
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        **state.signer.headers(webhook_id, event),
    }
    started = time.monotonic()
    result: dict[str, object] = {"webhook_id": webhook_id}
    try:
        async with (
            asyncio.timeout(state.settings.delivery_timeout),
            state.callback_client.post(wanted.url, event, headers) as response,
        ):
            excerpt = await read_excerpt(response)
            result |= {
                "delivered": 200 <= response.status_code < 300,
                "status": response.status_code,
                "error": None,
                "response_excerpt": excerpt,
            }
    except (httpx.HTTPError, TimeoutError, OSError) as exc:
        result |= {"delivered": False, "status": None, "error": failure_class(exc)}
    result["duration_ms"] = round((time.monotonic() - started) * 1000, 1)
    return JSONResponse(result)
