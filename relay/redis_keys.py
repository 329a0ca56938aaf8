"""Every Redis key the relay uses, in one place (arq's own keys live under ARQ_QUEUE's prefix).

relay:job:{request_id}    hash   one tracked job (fields: see relay.store.Field)
relay:ref:{reference_id}  string request id of the newest tracked job with that reference_id
relay:polls               zset   request id -> when it is next due (Redis clock, seconds);
                                 a claimed id is pushed a lease into the future, so a worker that
                                 dies simply lets its claims fall due again
relay:upstream:tat        string theoretical arrival time of the shared upstream rate budget (GCRA)
relay:upstream:paused     string Redis-clock time until which nobody polls (after an upstream 429)
relay:arq:queue           zset   arq's queue: deliveries only
"""

from __future__ import annotations

PREFIX = "relay:"
POLLS = PREFIX + "polls"
UPSTREAM_TAT = PREFIX + "upstream:tat"
UPSTREAM_PAUSED = PREFIX + "upstream:paused"
ARQ_QUEUE = PREFIX + "arq:queue"


def job(request_id: str) -> str:
    return f"{PREFIX}job:{request_id}"


def ref(reference_id: str) -> str:
    return f"{PREFIX}ref:{reference_id}"
