"""What every API route reads: the process's long-lived parts, built once in the lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis
from starlette.requests import Request

from relay.api.limits import UploadSlots
from relay.delivery.netpolicy import NetworkPolicy
from relay.jobs.store import JobStore
from relay.settings import Settings
from relay.upstream import Upstream


@dataclass
class AppState:
    settings: Settings
    redis: Redis
    store: JobStore
    upstream: Upstream
    policy: NetworkPolicy
    uploads: UploadSlots


def app_state(request: Request) -> AppState:
    state: AppState = request.state.relay
    return state
