"""Every Redis key the relay uses, in one place, arq's included.

relay:job:{request_id}      hash   one tracked job (fields: see relay.jobs.store.Job) and its final
                                   event's delivery (relay.delivery.store.Delivery)
relay:ref:{reference_id}    string request id of the newest tracked job with that reference_id
relay:caller-jobs:{caller}  zset   request id -> when it was tracked (Redis clock): a caller's jobs,
                                   for its list route; entries older than RELAY_MAX_JOB_AGE +
                                   RELAY_JOB_RETENTION are trimmed, those of expired jobs dropped
                                   when read
relay:caller-ref:{caller}:{reference_id}
                            zset   the same, for that caller's jobs with that reference_id (two
                                   callers may use one reference_id)
relay:audit:{request_id}    list   who steered the job: JSON entries (time, caller, action:
                                   redeliver, recover, watch), newest first, at most 50; expires
                                   with the job
relay:polls                 zset   request id -> when it is next due (Redis clock, seconds);
                                   a claimed id is pushed a lease into the future, so a worker
                                   that dies simply lets its claims fall due again
relay:created               zset   request id -> when it was tracked (Redis clock), for outstanding
                                   jobs only: where a sweep's window of the list starts
relay:sweep:lease           string token of the worker running the one sweep (expires: a dead
                                   sweeper's lease runs out within RELAY_POLL_LEASE)
relay:sweep:state           hash   what sweeps learned: list order, where the window began
                                   (oldest-first lists), last duration and page size, failures
relay:upstream:tat          string theoretical arrival time of the upstream budget's shared part
                                   (GCRA)
relay:upstream:tat:reads    string the same for the status reads' own share of the budget
relay:upstream:paused       string Redis-clock time until which nobody polls (after a 429)
relay:fair:queue            zset   API calls waiting for a slot of the budget's shared part:
                                   ticket (sequence|deadline) -> start tag (relay.jobs.fair_share)
relay:fair:granted          zset   ticket -> Redis-clock time of the slot it was granted, until
                                   its waiter reads it
relay:fair:tags             hash   the fair queue's virtual time (v), each caller's last finish
                                   tag (f:{caller}) and the ticket sequence (seq)
relay:caller:{name}:submits string theoretical arrival time of the caller's submit_rate (GCRA)
relay:caller:{name}:outstanding
                            zset   the caller's jobs not yet ended: request id -> when tracked
relay:idem:{caller}:{route}:{key}
                            hash   one Idempotency-Key's claim and first answer (caller: the
                                   caller's name, relay.callers; route: the submit path)
relay:idem-held:{caller}    zset   the Idempotency-Key records a caller holds -> Redis-clock
                                   time each stops counting (RELAY_IDEMPOTENCY_MAX_KEYS)
relay:webhook-key:{key id}  string when the relay first published that ed25519 public key
relay:console:session:{digest}
                            string a console session (the key that signed in, its CSRF token),
                                   named by a digest of its id; sign-out deletes it, 8 h at most
relay:steering:{action}:{caller}
                            string redeliver, recover or test-event requests the caller made in its
                                   current minute (expires)
relay:stats:{outcome}:{minute}
                            string callbacks delivered / failed in that minute (kept 2 h)
relay:api:write_check       string written before each round of submissions: Redis takes writes
relay:ready:write_check     string written by every Redis check (relay.redis.watch): readiness
                                   fails while Redis refuses it
relay:destination:{dest}   hash   a callback destination's breaker: consecutive failures, and
                                   `probe` while one attempt probes it half-open
                                   (dest = scheme://host:port; expires a day after the last)
relay:destinations:backed_off zset destination -> Redis-clock time it is backed off until
relay:attempts:{delivery id} list   a delivery's attempt log (JSON entries, oldest first; once
                                   trimmed: the first entries, a count of those left out, the
                                   newest)
relay:deliveries:{state}    zset   delivery id -> when it entered that state (pending, failing,
                                   delivered, gone, failed); a delivery id is the request id for
                                   the final event, {request_id}#processing for the other
relay:sending:{request_id}  string held while an early event (lipsync.processing) is being sent;
                                   the final event's attempts wait for it
relay:stranded:lease       string which worker runs the stranded-delivery sweep this interval
relay:history:{request_id}  list   a job's events (JSON, one per sequence number, oldest first),
                                   kept as long as the job (relay.jobs.history)
relay:feed:{caller}         stream a caller's job events as pointers (request id, sequence),
                                   cursor = stream id; trimmed to RELAY_JOB_RETENTION
relay:events                channel every job event announced as [request id, caller, sequence,
                                   flags] (pub/sub: wakes the API's waiters; never stored)
relay:intent:{intent id}   hash   a submission's intent, written before its upstream create and
                                   removed once the job is tracked (relay.jobs.intents)
relay:intents               zset   intent id -> Redis-clock time a worker should look for its job
relay:intents:ref:{ref}     zset   intent id -> when it was opened, per reference_id: the open
                                   submissions that could own an upstream job with that reference
relay:reconcile:lease       string which worker reconciles due intents this interval
relay:epoch                 string the marker every process checks to notice an emptied Redis
relay:data-lost             string why the relay believes Redis lost its data (until acknowledged)
relay:arq:queue             zset   arq's queue: deliveries only
relay:arq:health            string arq's health check record
relay:workers               zset   worker (host:pid) -> Redis-clock time its heartbeat lasts until
arq:job:{job id}            string a queued arq job (arq's own prefix, not configurable)
arq:in-progress:{job id}    string an arq job being run (expires after its timeout + 10 s)
arq:result:{job id}         string an arq job's result, kept `keep_result` seconds
arq:retry:{job id}          string an arq job's try count

arq job ids: `deliver:{request_id}:{attempt}`, one per delivery attempt (for a first attempt
made in-process: its guard, in case the worker dies); `deliver:{request_id}:{attempt}:{ms}` for
an attempt postponed to a backed-off destination's retry time.
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
CREATED = PREFIX + "created"
SWEEP_LEASE = PREFIX + "sweep:lease"
SWEEP_STATE = PREFIX + "sweep:state"
UPSTREAM_TAT = PREFIX + "upstream:tat"
UPSTREAM_READS_TAT = PREFIX + "upstream:tat:reads"
UPSTREAM_PAUSED = PREFIX + "upstream:paused"
FAIR_QUEUE = PREFIX + "fair:queue"
FAIR_GRANTED = PREFIX + "fair:granted"
FAIR_TAGS = PREFIX + "fair:tags"
WRITE_CHECK = PREFIX + "api:write_check"
READY_WRITE_CHECK = PREFIX + "ready:write_check"
BACKED_OFF = PREFIX + "destinations:backed_off"
EPOCH = PREFIX + "epoch"
DATA_LOST = PREFIX + "data-lost"
ARQ_QUEUE = PREFIX + "arq:queue"
STATS_PREFIX = PREFIX + "stats:"
DELIVERIES_PREFIX = PREFIX + "deliveries:"
STRANDED_LEASE = PREFIX + "stranded:lease"
INTENTS = PREFIX + "intents"
RECONCILE_LEASE = PREFIX + "reconcile:lease"
ARQ_HEALTH = PREFIX + "arq:health"
HISTORY_PREFIX = PREFIX + "history:"
FEED_PREFIX = PREFIX + "feed:"
EVENTS_CHANNEL = PREFIX + "events"
WORKERS = PREFIX + "workers"
ARQ_JOB_PREFIX = job_key_prefix
ARQ_IN_PROGRESS_PREFIX = in_progress_key_prefix
ARQ_RESULT_PREFIX = result_key_prefix
ARQ_RETRY_PREFIX = retry_key_prefix


def job(request_id: str) -> str:
    return f"{PREFIX}job:{request_id}"


def ref(reference_id: str) -> str:
    return f"{PREFIX}ref:{reference_id}"


def caller_jobs(caller: str) -> str:
    return f"{PREFIX}caller-jobs:{caller}"


def caller_ref(caller: str, reference_id: str) -> str:
    return f"{PREFIX}caller-ref:{caller}:{reference_id}"


def audit(request_id: str) -> str:
    return f"{PREFIX}audit:{request_id}"


def destination(dest: str) -> str:
    return f"{PREFIX}destination:{dest}"


def delivery_job_id(request_id: str, attempt: int) -> str:
    return f"deliver:{request_id}:{attempt}"


def idempotency(caller: str, route: str, key: str) -> str:
    return f"{PREFIX}idem:{caller}:{route}:{key}"


def idempotency_held(caller: str) -> str:
    return f"{PREFIX}idem-held:{caller}"


def steering(action: str, caller: str) -> str:
    return f"{PREFIX}steering:{action}:{caller}"


def webhook_key(key_id: str) -> str:
    return f"{PREFIX}webhook-key:{key_id}"


def console_session(digest: str) -> str:
    return f"{PREFIX}console:session:{digest}"


def stats(outcome: str, minute: int) -> str:
    return f"{STATS_PREFIX}{outcome}:{minute}"


def postponed_job_id(request_id: str, attempt: int, until_ms: int) -> str:
    return f"deliver:{request_id}:{attempt}:{until_ms}"


def attempts(delivery_id: str) -> str:
    return f"{PREFIX}attempts:{delivery_id}"


def deliveries(state: str) -> str:
    return f"{DELIVERIES_PREFIX}{state}"


def sending(request_id: str) -> str:
    return f"{PREFIX}sending:{request_id}"


def history(request_id: str) -> str:
    return f"{HISTORY_PREFIX}{request_id}"


def feed(caller: str) -> str:
    return f"{FEED_PREFIX}{caller}"


def intent(intent_id: str) -> str:
    return f"{PREFIX}intent:{intent_id}"


def intents_by_ref(reference_id: str) -> str:
    return f"{PREFIX}intents:ref:{reference_id}"


def caller_submits(caller: str) -> str:
    return f"{PREFIX}caller:{caller}:submits"


def caller_outstanding(caller: str) -> str:
    return f"{PREFIX}caller:{caller}:outstanding"
