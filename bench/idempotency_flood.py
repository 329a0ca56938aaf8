"""Issue 24, finding 1, replayed: refused 1 MB bodies under fresh Idempotency-Keys against Redis.

Run: uv run python bench/idempotency_flood.py [--requests 20] [--fields 80000] [--maxmemory 100mb]

Starts a real redis-server (`--maxmemory` with noeviction when given), the sandbox upstream and
the API (`relay api`, default settings) as separate processes. One caller sends `--requests`
JSON submits of valid inputs plus `--fields` unknown fields (about 1 MB, a 422), each under a
new Idempotency-Key; then another caller submits a job and /readyz is read. Prints Redis
`used_memory` before and after, the statuses the flood got, what the other caller got, and
MEMORY USAGE of the largest Idempotency-Key record.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import cast

import httpx
import orjson
from redis import Redis

sys.path.insert(0, str(Path(__file__).parent))
from forward import BODY, start

from relay.devtools.embedded_redis import embedded_redis
from relay.devtools.ports import free_port

ATTACKER = "attacker-key-0123456789"
VICTIM = "victim-key-0123456789"


def used_mb(redis_url: str) -> float:
    client = Redis.from_url(redis_url)
    try:
        info: dict[str, object] = client.info("memory")  # type: ignore[assignment]
        return int(str(info["used_memory"])) / 1e6
    finally:
        client.close()


def record_bytes(redis_url: str) -> tuple[int, int]:
    """MEMORY USAGE of the largest Idempotency-Key record, and of the callers' counts."""
    client = Redis.from_url(redis_url)

    def usage(pattern: str) -> list[int]:
        return [cast(int, client.memory_usage(key) or 0) for key in client.scan_iter(pattern)]

    try:
        return max(usage("relay:idem:*"), default=0), sum(usage("relay:idem-held:*"))
    finally:
        client.close()


def main(requests: int, fields: int, maxmemory: str | None) -> None:
    sandbox_port, api_port = free_port(), free_port()
    options = ("--maxmemory", maxmemory, "--maxmemory-policy", "noeviction") if maxmemory else ()
    body = orjson.dumps({**BODY, **{f"u{i}": 0 for i in range(fields)}})
    with embedded_redis(avoid=(sandbox_port, api_port), options=options) as redis_url:
        env = {
            **os.environ,
            "CHAMELAION_BASE_URL": f"http://127.0.0.1:{sandbox_port}/api",
            "CHAMELAION_API_KEY": "sandbox-key",
            "RELAY_REDIS_URL": redis_url,
            "RELAY_API_KEYS": f"{ATTACKER},{VICTIM}",
            "RELAY_LOG_FORMAT": "json",
        }
        relay = [sys.executable, "-m", "relay.cli"]
        sandbox_health = f"http://127.0.0.1:{sandbox_port}/api/health"
        procs = [start([*relay, "sandbox", "--port", str(sandbox_port)], env, sandbox_health)]
        api_health = f"http://127.0.0.1:{api_port}/healthz"
        procs.append(start([*relay, "api", "--port", str(api_port)], env, api_health))
        api = f"http://127.0.0.1:{api_port}"
        url = api + "/api/v1/lipsync/generate"
        try:
            with httpx.Client(timeout=60) as client:
                warm = client.post(url, json=BODY, headers={"x-api-key": VICTIM})
                assert warm.status_code == 200, warm.text
                before = used_mb(redis_url)
                statuses: Counter[int] = Counter()
                largest = 0
                started = time.monotonic()
                for _ in range(requests):
                    answer = client.post(
                        url,
                        content=body,
                        headers={
                            "x-api-key": ATTACKER,
                            "content-type": "application/json",
                            "idempotency-key": uuid.uuid4().hex,
                        },
                    )
                    statuses[answer.status_code] += 1
                    largest = max(largest, len(answer.content))
                took = time.monotonic() - started
                after = used_mb(redis_url)
                victim = client.post(
                    url, json=BODY, headers={"x-api-key": VICTIM, "idempotency-key": "v-1"}
                )
                ready = client.get(api + "/readyz")
            print(
                f"{requests} requests of {len(body) / 1e6:.2f} MB ({fields} unknown fields), "
                f"fresh keys, maxmemory {maxmemory or 'none'}: statuses {dict(statuses)}, "
                f"largest answer {largest / 1e6:.3f} MB, {took:.1f} s"
            )
            print(
                f"Redis used_memory {before:.2f} -> {after:.2f} MB "
                f"(+{(after - before) * 1e3 / requests:.1f} kB per request)"
            )
            print(
                f"then another caller's submit: {victim.status_code}, /readyz: {ready.status_code}"
            )
            record, counts = record_bytes(redis_url)
            print(f"MEMORY USAGE: largest record {record} B, the callers' counts {counts} B")
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=30)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--fields", type=int, default=80_000)
    parser.add_argument("--maxmemory", default=None)
    args = parser.parse_args()
    main(args.requests, args.fields, args.maxmemory)
