"""No delivery is ever stranded: a pending delivery whose queued attempt vanished is requeued."""

from __future__ import annotations

import redis

from relay.redis import keys
from tests.helpers import attempts, submit, verified
from tests.stack import Receiver, Stack, eventually, job_field, relay_stack

SWEEP = {
    "RELAY_STRANDED_SWEEP_INTERVAL": "0.3",
    "RELAY_STRANDED_AFTER": "0.5",
    # The retry after the first failure is an hour away: only the sweep can bring it sooner.
    "RELAY_DELIVERY_RETRY_SCHEDULE": "0,3600",
}


def test_a_lost_attempt_is_requeued_and_delivered(redis_url: str) -> None:
    receiver = Receiver(script=[500])
    with relay_stack(redis_url, receiver=receiver, env=SWEEP) as stack:
        request_id = submit(stack)
        receiver.wait_for(1)
        eventually(lambda: job_field(redis_url, request_id, "attempt") == b"1")
        job_id = keys.delivery_job_id(request_id, 1)
        client = redis.Redis.from_url(redis_url)
        try:
            eventually(lambda: client.zscore(keys.ARQ_QUEUE, job_id) is not None)
            # arq loses the deferred attempt (given up, cancelled, or lost in a failover).
            client.zrem(keys.ARQ_QUEUE, job_id)
            client.delete(keys.ARQ_JOB_PREFIX + job_id)
        finally:
            client.close()
        callbacks = receiver.wait_for(2)
        assert verified(stack, callbacks[1]) == verified(stack, callbacks[0])
        log = eventually(
            lambda: (found := attempts(stack, request_id)) and len(found) >= 3 and found
        )
        assert "stranded-delivery sweep" in str(log[1]["note"])
        assert log[-1]["state"] == "delivered"


def test_a_deferred_attempt_is_left_alone(redis_url: str) -> None:
    receiver = Receiver(script=[500])
    with relay_stack(redis_url, receiver=receiver, env=SWEEP) as stack:
        request_id = submit(stack)
        receiver.wait_for(1)
        eventually(lambda: job_field(redis_url, request_id, "attempt") == b"1")
        start = sweeps(stack)
        # Several sweeps pass after the attempt was queued; none makes it early.
        eventually(lambda: sweeps(stack) >= start + 3, timeout=10)
        assert len(receiver.received) == 1
        assert len(attempts(stack, request_id)) == 1
        assert sample(stack, "relay_stranded_requeued_total") == 0


def sample(stack: Stack, name: str) -> float:
    text = stack.worker_metrics()
    [line] = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(line.split()[1])


def sweeps(stack: Stack) -> float:
    return sample(stack, "relay_stranded_sweeps_total")
