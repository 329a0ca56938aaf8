"""Idempotency-Key on both submit routes: one upstream job per key, whatever the retries."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis

from relay.devtools.embedded_redis import embedded_redis
from tests.helpers import AUDIO, VIDEO, two_teams
from tests.stack import RELAY_KEY, Stack, eventually, relay_stack

BODY = {
    "inputs": [{"type": "video", "url": VIDEO}, {"type": "audio", "url": AUDIO}],
    "reference_id": "idem-1",
}


def upstream_jobs(stack: Stack) -> int:
    total: int = stack.upstream("GET", "/api/v1/lipsync/requests").json()["pagination"]["total"]
    return total


def post(
    stack: Stack, key: str | None, body: object = BODY, *, api_key: str = RELAY_KEY
) -> httpx.Response:
    headers = {"x-api-key": api_key}
    if key is not None:
        headers["idempotency-key"] = key
    # Generous: a 1 MB body of unknown fields is a lot of validation on a loaded machine.
    return httpx.post(
        stack.api_url + "/api/v1/lipsync/generate", json=body, headers=headers, timeout=60
    )


def test_the_sdk_retrying_with_one_key_creates_one_job(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        client = stack.sdk()
        answers = [
            client.lipsync.generate(
                inputs=BODY["inputs"],  # type: ignore[arg-type]
                reference_id="idem-1",
                extra_headers={"Idempotency-Key": "order-42"},
            )
            for _ in range(3)
        ]
        assert len({answer.request_id for answer in answers}) == 1
        assert upstream_jobs(stack) == 1
        replay = post(stack, "order-42")
        assert replay.status_code == 200
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.json()["request_id"] == answers[0].request_id
        # Without a key, or with another one, a new job is made as before.
        assert post(stack, None).status_code == 200
        assert post(stack, "order-43").status_code == 200
        assert upstream_jobs(stack) == 3


def test_the_same_key_with_another_body_is_422(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        assert post(stack, "k").status_code == 200
        other = post(stack, "k", {**BODY, "reference_id": "idem-2"})
        assert other.status_code == 422
        assert "Idempotency-Key" in other.json()["error"]
        assert upstream_jobs(stack) == 1


def test_keys_are_scoped_per_caller(redis_url: str, tmp_path: Path) -> None:
    second_key = "another-relay-key-0123456789"
    env = two_teams(tmp_path / "callers.json", second_key)
    with relay_stack(redis_url, workers=0, env=env) as stack:
        first = post(stack, "shared")
        # Another caller's same key neither replays the first caller's answer nor is refused.
        second = post(stack, "shared", api_key=second_key)
        assert first.status_code == second.status_code == 200
        assert first.json()["request_id"] != second.json()["request_id"]
        assert "idempotent-replayed" not in second.headers
        assert upstream_jobs(stack) == 2


def test_a_retry_while_the_first_is_in_flight_is_409(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        stack.upstream(
            "POST", "/_sandbox/faults", json={"paths": "generate", "delay": 1.5, "count": 1}
        )
        first: list[httpx.Response] = []
        thread = threading.Thread(target=lambda: first.append(post(stack, "slow")))
        thread.start()
        eventually(lambda: stack.upstream("GET", "/_sandbox/stats").json()["calls"])
        racing = post(stack, "slow")
        thread.join()
        assert racing.status_code == 409
        assert racing.headers["retry-after"] == "1"
        assert first[0].status_code == 200
        assert post(stack, "slow").json() == first[0].json()
        assert upstream_jobs(stack) == 1


def test_a_retryable_failure_releases_the_key(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        stack.upstream(
            "POST", "/_sandbox/faults", json={"paths": "generate", "status": 500, "count": 1}
        )
        assert post(stack, "again").status_code == 502
        retried = post(stack, "again")
        assert retried.status_code == 200
        assert "idempotent-replayed" not in retried.headers
        assert upstream_jobs(stack) == 1


def test_a_refused_body_is_replayed_as_refused(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        bad: dict[str, object] = {"inputs": []}
        assert post(stack, "bad", bad).status_code == 422
        replay = post(stack, "bad", bad)
        assert replay.status_code == 422 and replay.headers["idempotent-replayed"] == "true"


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "tab\there"])
def test_bad_keys_are_400(redis_url: str, key: str) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        headers = {b"x-api-key": RELAY_KEY.encode(), b"idempotency-key": key.encode()}
        answer = httpx.post(stack.api_url + "/api/v1/lipsync/generate", json=BODY, headers=headers)
        assert answer.status_code == 400
        assert "Idempotency-Key" in answer.json()["error"]
        assert upstream_jobs(stack) == 0


def test_uploads_replay_by_key_once_the_first_completed(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        files = {
            "video": ("a.mp4", b"v" * 1000, "video/mp4"),
            "audio": ("a.wav", b"a" * 500, "audio/wav"),
        }
        headers = {"x-api-key": RELAY_KEY, "idempotency-key": "upload-1"}
        url = stack.api_url + "/api/v1/lipsync/generate-with-media"
        first = httpx.post(url, files=files, headers=headers)
        second = httpx.post(url, files=files, headers=headers)
        assert first.status_code == second.status_code == 200
        assert second.headers["idempotent-replayed"] == "true"
        assert first.json() == second.json()
        assert upstream_jobs(stack) == 1


# --- Issue #24, finding 1: one caller's Idempotency-Keys must not fill Redis ----------------

OTHER_KEY = "another-relay-key-0123456789"
# redis-server arguments of the production setting that turned a full Redis into an outage.
SMALL_REDIS = ("--maxmemory", "40mb", "--maxmemory-policy", "noeviction")


def unknown_fields(count: int) -> dict[str, object]:
    """A body near RELAY_MAX_BODY_BYTES whose every field but the inputs is unknown (a 422)."""
    return {**BODY, **{f"u{i}": 0 for i in range(count)}}


def used_memory(redis_url: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        info: dict[str, Any] = client.info("memory")  # type: ignore[assignment]
        return int(info["used_memory"])
    finally:
        client.close()


def kept_bytes(redis_url: str) -> int:
    """MEMORY USAGE of every Idempotency-Key record and every caller's count of them."""
    client = redis.Redis.from_url(redis_url)
    try:
        found = [k for p in ("relay:idem:*", "relay:idem-held:*") for k in client.scan_iter(p)]
        return sum(cast(int, client.memory_usage(key)) for key in found)
    finally:
        client.close()


@pytest.mark.long
def test_a_flood_of_large_refusals_under_fresh_keys_keeps_redis_small() -> None:
    # The attack, test-sized: 1 MB bodies of unknown fields, each under a new key. A
    # whole 422 kept per key (5 MB each) filled a 40 MB Redis in a handful of requests, and
    # then every caller's submit was 503. Ten of them would keep 50 MB that way: more than
    # the Redis holds, so each check below still fails should whole answers be kept again.
    body = unknown_fields(80_000)
    sent = 10
    with (
        embedded_redis(options=SMALL_REDIS) as redis_url,
        relay_stack(
            redis_url, workers=0, env={"RELAY_API_KEYS": f"{RELAY_KEY},{OTHER_KEY}"}
        ) as stack,
    ):
        assert post(stack, "warm-up").status_code == 200  # scripts loaded, pools open
        before = used_memory(redis_url)
        answers = [post(stack, f"flood-{n}", body) for n in range(sent)]
        grown = used_memory(redis_url) - before
        assert [a.status_code for a in answers] == [422] * sent
        # Everyone else still submits.
        assert post(stack, "other-caller", api_key=OTHER_KEY).status_code == 200
        assert post(stack, "same-caller").status_code == 200
        assert httpx.get(stack.api_url + "/readyz").status_code == 200
        # Each kept refusal is a fingerprint, a status and at most KEPT_BODY_LIMIT bytes of
        # error: with Redis's own overhead, and the caller's count, under 2 KiB a key.
        assert 0 < kept_bytes(redis_url) < sent * 2048
        # used_memory also moves with buffers and caches; before, it grew by a full 40 MB.
        assert grown < 2_000_000, grown
        content = answers[-1].json()
        assert len(content["details"]) == 20
        assert content["details_omitted"] == 80_000 - 20
        assert len(answers[-1].content) < 4096
        replay = post(stack, "flood-3", body)
        assert replay.status_code == 422 and replay.headers["idempotent-replayed"] == "true"
        assert replay.json()["error"] == content["error"]


def test_error_details_are_capped_on_every_route(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        headers = {"x-api-key": RELAY_KEY}
        junk = {f"u{i}": 0 for i in range(5000)}
        for path, body in [
            ("/api/v1/lipsync/generate", unknown_fields(5000)),
            ("/api/relay/v1/test-events", {"url": "http://127.0.0.1:9/", **junk}),
            ("/api/relay/v1/watches", {"request_id": "r", **junk}),
        ]:
            answer = httpx.post(stack.api_url + path, json=body, headers=headers)
            assert answer.status_code == 422, (path, answer.text[:200])
            assert len(answer.json()["details"]) == 20
            assert answer.json()["details_omitted"] >= 5000 - 20


def test_a_long_field_name_is_shortened_in_the_error(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        answer = post(stack, None, {**BODY, "x" * 100_000: 1})
        assert answer.status_code == 422
        assert len(answer.content) < 1024
        assert answer.json()["details"][0]["field"].startswith("xxx")


def test_each_caller_holds_a_bounded_number_of_keys(redis_url: str, tmp_path: Path) -> None:
    env = {**two_teams(tmp_path / "callers.json", OTHER_KEY), "RELAY_IDEMPOTENCY_MAX_KEYS": "3"}
    with relay_stack(redis_url, workers=0, env=env) as stack:
        bad: dict[str, object] = {"inputs": []}
        assert [post(stack, f"k{n}", bad).status_code for n in range(3)] == [422] * 3
        refused = post(stack, "k3", bad)
        assert refused.status_code == 429
        assert "RELAY_IDEMPOTENCY_MAX_KEYS" in refused.json()["error"]
        assert "3" in refused.json()["error"]
        # Until its oldest key stops counting: a day (RELAY_IDEMPOTENCY_TTL) and a bit.
        assert 86400 < int(refused.headers["retry-after"]) < 2 * 86400
        # A key already held still replays, a request without a key still runs, and another
        # caller has its own allowance.
        assert post(stack, "k1", bad).headers["idempotent-replayed"] == "true"
        assert post(stack, None).status_code == 200
        assert post(stack, "k3", api_key=OTHER_KEY).status_code == 200
        metrics = httpx.get(stack.api_url + "/metrics").text
        assert "relay_idempotency_keys_refused_total 1.0" in metrics
        # A released key (a retryable failure) frees its place.
        stack.upstream(
            "POST", "/_sandbox/faults", json={"paths": "generate", "status": 500, "count": 1}
        )
        assert post(stack, "retry", api_key=OTHER_KEY).status_code == 502
        assert post(stack, "k4", api_key=OTHER_KEY).status_code == 200
        assert post(stack, "k5", api_key=OTHER_KEY).status_code == 200
        assert post(stack, "k6", api_key=OTHER_KEY).status_code == 429


def set_maxmemory(redis_url: str, limit: int | None = None) -> int:
    """Set Redis's maxmemory (None: half of what it uses now, so it is full); returns the old."""
    client = redis.Redis.from_url(redis_url)
    try:
        config: dict[str, str] = client.config_get("maxmemory")  # type: ignore[assignment]
        old = int(config["maxmemory"])
        if limit is None:
            limit = used_memory(redis_url) // 2
        client.config_set("maxmemory", limit)
        return old
    finally:
        client.close()


def writable_metric(base_url: str) -> str:
    for line in httpx.get(base_url + "/metrics").text.splitlines():
        if line.startswith("relay_redis_writable "):
            return line.split()[1]
    raise AssertionError("no relay_redis_writable in /metrics")


def test_readiness_fails_while_redis_refuses_writes() -> None:
    # Full under noeviction, Redis still answers reads: /readyz said 200 while every submit
    # was refused.
    with (
        embedded_redis(options=SMALL_REDIS) as redis_url,
        relay_stack(redis_url, workers=1) as stack,
    ):
        probes = [stack.api_url, stack.worker_urls[0]]
        assert [httpx.get(url + "/readyz").status_code for url in probes] == [200, 200]
        # Full: data past maxmemory. (Filled with keys, Redis stays just under the limit
        # once the refused write's own buffer is freed; this is the state an outage ends in.)
        limit = set_maxmemory(redis_url)
        try:
            assert post(stack, None).status_code == 503  # no submit can be recorded
            for url in probes:
                ready = httpx.get(url + "/readyz")
                assert ready.status_code == 503
                assert "refuses writes" in ready.json()["error"]
                assert "maxmemory" in ready.json()["error"]
                assert writable_metric(url) == "0.0"
        finally:
            set_maxmemory(redis_url, limit)
        assert [httpx.get(url + "/readyz").status_code for url in probes] == [200, 200]
        assert [writable_metric(url) for url in probes] == ["1.0", "1.0"]
