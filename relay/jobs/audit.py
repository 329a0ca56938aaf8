"""Who steered a job: every steering action (redeliver, recover, watch) with its caller's name,
logged and kept in a short list per job, for the job's page.

`relay:audit:{request_id}` is a list of JSON entries, newest first, at most MAX_ENTRIES (older
ones are dropped: the log lines keep them all), and it expires with the job (its retention
from the last action).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from redis.asyncio import Redis

from relay.redis import keys
from relay.redis.batch import batcher

log = logging.getLogger(__name__)

MAX_ENTRIES = 50


class Audit:
    def __init__(self, redis: Redis, *, retention: float) -> None:
        self.redis = redis
        self.retention = int(retention)

    async def record(
        self, request_id: str, *, caller: str, action: str, detail: str | None = None
    ) -> None:
        """Write down that `caller` did `action` to the job (and log it)."""
        entry: dict[str, Any] = {"at": round(time.time(), 3), "caller": caller, "action": action}
        if detail:
            entry["detail"] = detail
        key = keys.audit(request_id)
        await batcher(self.redis).run(
            [
                ("LPUSH", key, orjson.dumps(entry)),
                ("LTRIM", key, 0, MAX_ENTRIES - 1),
                ("EXPIRE", key, self.retention),
            ],
            atomic=True,
        )
        log.info(
            "steering action",
            extra={"request_id": request_id, "caller": caller, "action": action, "detail": detail},
        )

    async def entries(self, request_id: str) -> list[dict[str, Any]]:
        """The job's audit entries, newest first."""
        (raw,) = await batcher(self.redis).run(
            [("LRANGE", keys.audit(request_id), 0, MAX_ENTRIES - 1)]
        )
        return [orjson.loads(item) for item in raw]
