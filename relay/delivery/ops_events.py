"""Operational events: `relay.delivery.exhausted` (a delivery gave up) and
`relay.destination.backed_off` (a receiver kept failing, so its destination is backed off),
signed with Standard Webhooks and posted to `RELAY_OPS_WEBHOOK_URL`, as Svix's operational
webhooks tell an operator what its endpoints' deliveries do.

They never hold up a callback: `publish` only files the event, and a task of its own sends it,
retried on RELAY_DELIVERY_RETRY_SCHEDULE. They are kept in the worker's memory, at most
`MAX_PENDING` at once (more are dropped, counted and logged), and a worker that stops sends
what it can until its drain ends: a notice, not a record (the attempt log and the metrics keep
the record). The URL is the operator's own, so no callback network policy applies to it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson

from relay.delivery.failure import FailureClass
from relay.http_client import AiohttpTransport
from relay.jitter import jittered
from relay.lifecycle import Service, wait_for_tasks
from relay.metrics import OPS_EVENTS
from relay.signing import Signer
from relay.upstream import USER_AGENT

log = logging.getLogger(__name__)

EXHAUSTED = "relay.delivery.exhausted"
BACKED_OFF = "relay.destination.backed_off"
MAX_PENDING = 1000


def _iso(seconds: float) -> str:
    return (
        datetime.fromtimestamp(seconds, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def last_attempt(
    attempt: int, *, status: int | None, error: FailureClass | None, detail: str, at: float
) -> dict[str, Any]:
    """What an event says of the attempt behind it (never its answer's body)."""
    return {
        "attempt": attempt,
        "status_code": status,
        "error": error,
        "detail": detail,
        "timestamp": _iso(at),
    }


class OpsEvents(Service):
    name = "ops-events"

    def __init__(
        self,
        url: str,
        signer: Signer,
        *,
        schedule: tuple[float, ...],
        timeout: float,
        clock: Callable[[], float],
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = url
        self.signer = signer
        self.schedule = schedule
        self.clock = clock
        self.client = client or httpx.AsyncClient(
            transport=AiohttpTransport(), timeout=timeout, follow_redirects=False
        )
        self.sending: set[asyncio.Task[None]] = set()

    def exhausted(
        self,
        *,
        job_id: str,
        delivery_id: str,
        event_type: str | None,
        webhook_id: str | None,
        destination: str,
        attempts: int,
        last: dict[str, Any],
    ) -> None:
        """A delivery gave up after its last attempt (`last`)."""
        self.publish(
            EXHAUSTED,
            # One event per delivery and attempt count: a re-run of the attempt sends the same
            # webhook-id, which the receiver deduplicates.
            f"{delivery_id}:{attempts}",
            {
                "job_id": job_id,
                "delivery_id": delivery_id,
                "event_type": event_type,
                "webhook_id": webhook_id,
                "destination": destination,
                "attempts": attempts,
                "last_attempt": last,
            },
        )

    def backed_off(
        self,
        *,
        destination: str,
        seconds: float,
        job_id: str,
        delivery_id: str,
        last: dict[str, Any],
    ) -> None:
        """`destination` is backed off for `seconds`, after the failure `last` of `job_id`."""
        now = self.clock()
        self.publish(
            BACKED_OFF,
            f"{destination}:{round(now + seconds)}",
            {
                "destination": destination,
                "backed_off_for": seconds,
                "until": _iso(now + seconds),
                "job_id": job_id,
                "delivery_id": delivery_id,
                "last_attempt": last,
            },
        )

    def publish(self, type_: str, key: str, data: dict[str, Any]) -> None:
        """File an event to send; returns at once (dropped, and counted, when too many wait)."""
        if len(self.sending) >= MAX_PENDING:
            OPS_EVENTS.labels(type_, "dropped").inc()
            log.warning("operational event dropped: too many unsent", extra={"type": type_})
            return
        webhook_id = "msg_ops_" + hashlib.sha256(f"{type_}:{key}".encode()).hexdigest()[:32]
        body = orjson.dumps({"type": type_, "timestamp": _iso(self.clock()), "data": data})
        task = asyncio.create_task(self._send(type_, webhook_id, body), name="ops-event")
        self.sending.add(task)
        task.add_done_callback(self.sending.discard)

    async def _send(self, type_: str, webhook_id: str, body: bytes) -> None:
        for attempt in range(len(self.schedule) + 1):
            if attempt:
                await asyncio.sleep(jittered(self.schedule[attempt - 1]))
            # Signed anew each attempt: its timestamp must stay within receivers' window.
            headers = {
                "content-type": "application/json",
                "user-agent": USER_AGENT,
                **self.signer.headers(webhook_id, body),
            }
            try:
                response = await self.client.post(self.url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                result = type(exc).__name__
            else:
                if response.is_success:
                    OPS_EVENTS.labels(type_, "delivered").inc()
                    return
                result = f"HTTP {response.status_code}"
            log.warning(
                "operational event not taken",
                extra={"type": type_, "attempt": attempt, "result": result},
            )
        OPS_EVENTS.labels(type_, "failed").inc()
        log.error("operational event given up", extra={"type": type_, "webhook_id": webhook_id})

    async def run(self, stop: asyncio.Event) -> None:
        await stop.wait()  # the sends are tasks of their own; nothing to take in here

    async def drain(self, deadline: float) -> None:
        await wait_for_tasks(lambda: self.sending, deadline)
        for task in list(self.sending):
            task.cancel()  # lost with the worker: counted nowhere else, so say so
            log.warning("operational event unsent at shutdown")

    async def aclose(self) -> None:
        await self.client.aclose()
