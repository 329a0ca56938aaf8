"""The dev inbox: a callback receiver for `relay dev` that verifies and shows what arrived.

It verifies exactly as a real receiver should, with the `standardwebhooks` package, and keeps
the last deliveries in memory for `GET /inbox`.
"""

from __future__ import annotations

from collections import deque
from datetime import UTC, datetime
from typing import Any

from pydantic import SecretStr
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

KEEP = 100


def create_inbox_app(secrets: tuple[SecretStr, ...]) -> Starlette:
    # Only the newest secret is needed to verify; any of them would do during a rotation.
    verifier = Webhook(secrets[-1].get_secret_value())
    received: deque[dict[str, Any]] = deque(maxlen=KEEP)

    async def receive(request: Request) -> Response:
        body = await request.body()
        entry: dict[str, Any] = {
            "received_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "webhook_id": request.headers.get("webhook-id"),
        }
        try:
            entry["payload"] = verifier.verify(body, dict(request.headers))
            entry["verified"] = True
        except WebhookVerificationError as exc:
            entry["verified"] = False
            entry["error"] = str(exc)
        received.appendleft(entry)
        return Response(status_code=204 if entry["verified"] else 400)

    async def show(request: Request) -> Response:
        return JSONResponse({"received": list(received)})

    return Starlette(
        routes=[Route("/inbox", receive, methods=["POST"]), Route("/inbox", show, methods=["GET"])]
    )
