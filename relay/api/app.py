"""The API process's app: Chamelaion's lip-sync routes under /api, plus health and metrics.

Shaped like Chamelaion's own API (paths, auth, `{"error": ...}` bodies), so the official SDK
works against it by changing only its base URL and key. This module only wires: the routes live
in relay.api.submit, relay.api.uploads and relay.api.status.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from relay.api import deliveries, feed, job_events, test_events, watches, webhook_keys
from relay.api.auth import ApiKeyMiddleware
from relay.api.budget import ActingCaller, ApiBudget
from relay.api.idempotency import idempotent
from relay.api.limits import UploadSlots
from relay.api.openapi import openapi_document
from relay.api.parked_reads import ParkedReads
from relay.api.protocol import PARKED, SHUTDOWN_HOOKS
from relay.api.response_counts import ResponseCounter
from relay.api.responses import api_error, client_disconnected, http_error, unexpected_error
from relay.api.state import AppState, app_state
from relay.api.status import get_request, list_requests
from relay.api.store_check import WriteCheck
from relay.api.submit import generate
from relay.api.traced import traced
from relay.api.uploads import generate_with_media
from relay.api.waiters import Waiters
from relay.api.waiting import waiting
from relay.callers.source import CallerSource
from relay.console.views import create_console
from relay.delivery.attempt_log import AttemptLog
from relay.delivery.control import Redeliverer
from relay.delivery.netpolicy import callback_policy
from relay.delivery.queue import DeliveryQueue
from relay.delivery.signers import CallerSigners
from relay.delivery.transport import make_callback_client
from relay.errors import ApiError
from relay.jobs.audit import Audit
from relay.jobs.fair_share import FairShare
from relay.jobs.history import History
from relay.jobs.intents import Intents
from relay.jobs.schedule import PollSchedule
from relay.jobs.store import JobStore
from relay.metrics import UPSTREAM_RATE_LIMIT, bound_callers
from relay.redis.conn import arq_view, connect
from relay.redis.conn import close as close_redis
from relay.redis.shared_state import metrics_response
from relay.redis.watch import RedisWatch, readiness
from relay.settings import Settings
from relay.upstream import Upstream

GENERATE = "/api/v1/lipsync/generate"
GENERATE_WITH_MEDIA = "/api/v1/lipsync/generate-with-media"


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    return await readiness(app_state(request).watch)


async def metrics(request: Request) -> Response:
    return await metrics_response(app_state(request).redis)


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_document())


def create_app(settings: Settings) -> Starlette:
    settings.require("api")
    # Read once here (a bad callers file stops the start-up), then kept current by itself.
    callers = CallerSource.from_settings(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        redis = connect(settings.redis_url, timeout=settings.redis_timeout)
        # The API's upstream calls spend the budget the workers share (relay.api.budget).
        schedule = PollSchedule(
            redis,
            rate=settings.upstream_rate_limit,
            lease=settings.poll_lease,
            max_pause=settings.max_upstream_pause,
            read_share=settings.status_read_share,
        )
        budget = ApiBudget(
            FairShare(redis, schedule),
            max_wait=settings.api_budget_wait,
            max_outstanding=settings.caller_max_outstanding,
            submit_rate=settings.caller_submit_rate,
        )
        UPSTREAM_RATE_LIMIT.set(settings.upstream_rate_limit)
        bound_callers(
            lambda name: callers.book.named(name) is not None, callers.book.names, role="api"
        )
        upstream = Upstream.from_settings(settings, budget=budget)
        policy = callback_policy(settings)
        callback_client = make_callback_client(policy, settings.delivery_timeout)
        store = JobStore(
            redis,
            wait_replicas=settings.redis_wait_replicas,
            wait_timeout=settings.redis_wait_timeout,
            retention=settings.job_retention,
            lifetime=settings.max_job_age + settings.job_retention,
        )
        attempt_log = AttemptLog(
            redis, retention=settings.job_retention, excerpts=settings.attempt_log_excerpt
        )
        # arq's client on the same connections: the API queues redeliveries. No clock: the
        # queue's script scores them on Redis's, whatever this process's own clock says.
        arq = arq_view(redis)
        queue = DeliveryQueue(arq, settings.delivery_retry_schedule, clock=None)
        audit = Audit(redis, retention=settings.job_retention)
        watch = RedisWatch(redis)
        stop_watching = asyncio.Event()
        watching = asyncio.create_task(watch.run(stop_watching), name="redis-watch")
        parked_reads = ParkedReads(store)
        waiters = Waiters(redis, parked_reads)
        listening = asyncio.create_task(waiters.run(stop_watching), name="events-subscription")
        try:
            yield {
                "relay": AppState(
                    settings=settings,
                    callers=callers,
                    redis=redis,
                    store=store,
                    upstream=upstream,
                    budget=budget,
                    policy=policy,
                    write_check=WriteCheck(redis),
                    watch=watch,
                    signers=CallerSigners(callers, settings.webhook_secrets),
                    callback_client=callback_client,
                    attempt_log=attempt_log,
                    redeliverer=Redeliverer(queue, store, attempt_log, audit),
                    uploads=UploadSlots(settings.max_uploads, settings.max_uploads_per_key),
                    intents=Intents(redis, store, settings),
                    audit=audit,
                    waiters=waiters,
                    parked_reads=parked_reads,
                    history=History(redis),
                ),
                # The server calls it as it starts shutting down (relay.api.protocol), while
                # requests still wait: they answer now rather than being cut off.
                SHUTDOWN_HOOKS: (waiters.drain,),
                # Requests waiting for job events are not requests in flight (503s beyond).
                PARKED: lambda: waiters.parked,
            }
        finally:
            stop_watching.set()
            await watching
            await listening
            await callback_client.aclose()
            await upstream.aclose()
            await close_redis(redis)

    routes = [
        # `Prefer: wait` around the idempotent answer: a replay waits like the first answer.
        Route(
            GENERATE,
            traced(waiting(idempotent(generate, buffered=True)), GENERATE),
            methods=["POST"],
        ),
        Route(
            GENERATE_WITH_MEDIA,
            traced(waiting(idempotent(generate_with_media, buffered=False)), GENERATE_WITH_MEDIA),
            methods=["POST"],
        ),
        Route("/api/v1/lipsync/requests/{id}", get_request, methods=["GET"]),
        Route("/api/v1/lipsync/requests", list_requests, methods=["GET"]),
        # Relay-only routes: their own namespace, never one of Chamelaion's paths.
        Route(webhook_keys.PATH, webhook_keys.webhook_keys, methods=["GET"]),
        Route(test_events.PATH, test_events.send_test_event, methods=["POST"]),
        Route(watches.PATH, watches.watch, methods=["POST"]),
        Route(f"{deliveries.PREFIX}/jobs/{{id}}/deliveries", deliveries.job_deliveries),
        # Named apart from the console routes of the same name (url_for is global).
        Route(
            f"{deliveries.PREFIX}/jobs/{{id}}/redeliver",
            deliveries.redeliver,
            methods=["POST"],
            name="api_redeliver",
        ),
        Route(f"{deliveries.PREFIX}/deliveries", deliveries.list_deliveries),
        Route(f"{deliveries.PREFIX}/jobs/{{id}}/events", job_events.job_events, methods=["GET"]),
        Route(f"{deliveries.PREFIX}/events", feed.feed, methods=["GET"]),
        Route(
            f"{deliveries.PREFIX}/deliveries/recover",
            deliveries.recover,
            methods=["POST"],
            name="api_recover",
        ),
        create_console(settings, callers),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[
            # Outermost of the app's own layers: it sees every answer, a 401 included.
            Middleware(ResponseCounter),
            Middleware(
                ApiKeyMiddleware,
                callers=callers,
                metrics_auth=settings.metrics_auth,
                public=(webhook_keys.PATH,),
            ),
            # Inside the auth: the resolved caller is whose account upstream calls book.
            Middleware(ActingCaller),
        ],
        exception_handlers={
            ApiError: api_error,
            HTTPException: http_error,
            ClientDisconnect: client_disconnected,
            Exception: unexpected_error,
        },
    )
