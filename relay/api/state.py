"""What every API route reads: the process's long-lived parts, built once in the lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis
from starlette.requests import Request

from relay.api.budget import ApiBudget
from relay.api.limits import UploadSlots
from relay.api.parked_reads import ParkedReads
from relay.api.store_check import WriteCheck
from relay.api.waiters import Waiters
from relay.callers.source import CallerSource
from relay.delivery.attempt_log import AttemptLog
from relay.delivery.control import Redeliverer
from relay.delivery.netpolicy import NetworkPolicy
from relay.delivery.signers import CallerSigners
from relay.delivery.transport import CallbackClient
from relay.jobs.audit import Audit
from relay.jobs.history import History
from relay.jobs.intents import Intents
from relay.jobs.store import JobStore
from relay.redis.watch import RedisWatch
from relay.settings import Settings
from relay.upstream import Upstream


@dataclass
class AppState:
    settings: Settings
    callers: CallerSource  # who may call, and as whom (relay.callers)
    redis: Redis
    store: JobStore
    upstream: Upstream
    budget: ApiBudget  # the upstream budget `upstream` spends, for a booking made with a write
    policy: NetworkPolicy
    write_check: WriteCheck
    watch: RedisWatch
    # Whose secrets sign: a caller's own, else the global ones (whose signer is None when the
    # API has none); test events and the published keys need them.
    signers: CallerSigners
    callback_client: CallbackClient
    attempt_log: AttemptLog
    redeliverer: Redeliverer
    uploads: UploadSlots
    intents: Intents
    audit: Audit  # who steered each job
    # Requests waiting for jobs' events, and where the events are read.
    waiters: Waiters
    parked_reads: ParkedReads  # status reads that wait without a task
    history: History


def app_state(request: Request) -> AppState:
    # The lifespan's state as uvicorn copies it into each request's scope: `request.state`
    # builds a State object around the same dict first (1 to 2 us a request, for nothing).
    state: AppState = request.scope["state"]["relay"]
    return state
