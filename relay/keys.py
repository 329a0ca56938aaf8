"""Every Redis key the relay uses, in one place, arq's included.

relay:job:{request_id}      hash   one tracked job (fields: see relay.jobs.store.Job)
relay:ref:{reference_id}    string request id of the newest tracked job with that reference_id
relay:polls                 zset   request id -> when it is next due (Redis clock, seconds);
                                   a claimed id is pushed a lease into the future, so a worker
                                   that dies simply lets its claims fall due again
relay:upstream:tat          string theoretical arrival time of the shared upstream budget (GCRA)
relay:upstream:paused       string Redis-clock time until which nobody polls (after a 429)
relay:epoch                 string the marker every process checks to notice an emptied Redis
relay:data-lost             string why the relay believes Redis lost its data (until acknowledged)
relay:arq:queue             zset   arq's queue: deliveries only
relay:arq:health            string arq's health check record
arq:job:{job id}            string a queued arq job (arq's own prefix, not configurable)
arq:in-progress:{job id}    string an arq job being run (expires after its timeout + 10 s)
arq:result:{job id}         string an arq job's result, kept `keep_result` seconds
arq:retry:{job id}          string an arq job's try count

arq job ids: `deliver:{request_id}:{attempt}`, one per delivery attempt.
"""

from __future__ import annotations

from arq.constants import (
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)

PREFIX = "relay:"
POLLS = PREFIX + "polls"
UPSTREAM_TAT = PREFIX + "upstream:tat"
UPSTREAM_PAUSED = PREFIX + "upstream:paused"
EPOCH = PREFIX + "epoch"
DATA_LOST = PREFIX + "data-lost"
ARQ_QUEUE = PREFIX + "arq:queue"
ARQ_HEALTH = PREFIX + "arq:health"
ARQ_JOB_PREFIX = job_key_prefix
ARQ_IN_PROGRESS_PREFIX = in_progress_key_prefix
ARQ_RESULT_PREFIX = result_key_prefix
ARQ_RETRY_PREFIX = retry_key_prefix


def job(request_id: str) -> str:
    return f"{PREFIX}job:{request_id}"


def ref(reference_id: str) -> str:
    return f"{PREFIX}ref:{reference_id}"


def delivery_job_id(request_id: str, attempt: int) -> str:
    return f"deliver:{request_id}:{attempt}"
