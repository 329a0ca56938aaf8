"""A caller's event feed: its jobs' events in order after a cursor, long-polled when there are
none, per caller, and a cursor that holds across a Redis restart with AOF."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import redis

from relay.devtools.embedded_redis import find_redis_server
from relay.devtools.ports import free_port
from tests.helpers import AUDIO, SLOW, VIDEO, pin, two_teams
from tests.stack import RELAY_KEY, Stack, eventually, relay_stack

FEED = "/api/relay/v1/events"


def read_feed(
    stack: Stack, after: str = "0", key: str = RELAY_KEY, **params: str
) -> dict[str, Any]:
    response = httpx.get(
        stack.api_url + FEED,
        params={"after": after, **params},
        headers={"x-api-key": key},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    return page


def submit_without_callback(stack: Stack) -> str:
    """A job with no callback_url: the feed is how its caller hears of it."""
    job = stack.sdk().lipsync.generate(
        inputs=[{"type": "video", "url": VIDEO}, {"type": "audio", "url": AUDIO}]
    )
    return job.request_id


def test_the_feed_holds_the_callers_events_in_order_with_a_cursor(redis_url: str) -> None:
    with relay_stack(redis_url, sandbox=SLOW) as stack:
        first, second = submit_without_callback(stack), submit_without_callback(stack)
        page = eventually(lambda: (p := read_feed(stack)) and len(p["events"]) >= 4 and p)
        by_job: dict[str, list[int]] = {}
        for event in page["events"]:
            by_job.setdefault(event["request_id"], []).append(event["sequence"])
        assert by_job[first][:2] == [1, 2] and by_job[second][:2] == [1, 2], "in order per job"
        # From the cursor on: nothing, until something happens.
        cursor = page["next_cursor"]
        assert read_feed(stack, cursor) == {"events": [], "next_cursor": cursor}
        pin(stack, first, status="completed")
        later = eventually(lambda: (p := read_feed(stack, cursor)) and p["events"] and p)
        [ended] = later["events"]
        assert ended["request_id"] == first and ended["status"] == "completed"
        assert ended["sequence"] == by_job[first][-1] + 1
        assert ended["last"] is True, "no callback: the end is the job's last event"
        assert ended["data"]["status"] == "completed"
        # A small limit pages through the same events.
        one = read_feed(stack, limit="1")
        assert one["events"] == page["events"][:1]
        assert read_feed(stack, one["next_cursor"], limit="1")["events"] == page["events"][1:2]


def test_a_callers_feed_holds_its_own_jobs_only(redis_url: str, tmp_path: Path) -> None:
    other = "team-b-key-0123456789abcdef"
    with relay_stack(redis_url, sandbox=SLOW, env=two_teams(tmp_path / "c.json", other)) as stack:
        mine = submit_without_callback(stack)  # as team-a
        theirs = httpx.post(
            stack.api_url + "/api/v1/lipsync/generate",
            json={"inputs": [{"type": "video", "url": VIDEO}, {"type": "audio", "url": AUDIO}]},
            headers={"x-api-key": other},
            timeout=30,
        ).json()["request_id"]
        a = eventually(lambda: (p := read_feed(stack)) and p["events"] and p)
        b = eventually(lambda: (p := read_feed(stack, key=other)) and p["events"] and p)
        assert {e["request_id"] for e in a["events"]} == {mine}
        assert {e["request_id"] for e in b["events"]} == {theirs}


def test_a_feed_read_waits_for_the_next_event(redis_url: str) -> None:
    with relay_stack(redis_url, sandbox=SLOW) as stack, ThreadPoolExecutor(2) as pool:
        request_id = submit_without_callback(stack)
        page = eventually(lambda: (p := read_feed(stack)) and len(p["events"]) >= 2 and p)
        waiting = pool.submit(read_feed, stack, page["next_cursor"], wait="30")
        eventually(
            lambda: (
                'relay_api_waiting{kind="feed"} 1.0' in httpx.get(stack.api_url + "/metrics").text
            )
        )
        assert not waiting.done()
        pin(stack, request_id, status="failed")
        answer = waiting.result(timeout=30)
        assert [event["status"] for event in answer["events"]] == ["failed"]
        assert answer["next_cursor"] != page["next_cursor"]


def test_bad_feed_reads_are_refused(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        for params in ({"after": "yesterday"}, {"wait": "-1"}, {"wait": "61"}, {"limit": "0"}):
            response = httpx.get(
                stack.api_url + FEED, params=params, headers={"x-api-key": RELAY_KEY}
            )
            assert response.status_code == 400, params
            assert "error" in response.json()


def answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url).ping())
    except redis.ConnectionError:
        return False


@contextlib.contextmanager
def aof_redis() -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """A redis-server with AOF on in a directory of its own; the list holds its process (a
    restart replaces it)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="relay-aof-") as workdir:
        command = [
            find_redis_server(),
            "--port", str(port),
            "--dir", workdir,
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
        ]  # fmt: skip
        procs = [subprocess.Popen(command, stdout=subprocess.DEVNULL)]
        url = f"redis://127.0.0.1:{port}/0"
        eventually(lambda: answers(url))
        try:
            yield url, procs
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=10)


def test_the_cursor_holds_across_a_redis_restart_with_aof() -> None:
    with aof_redis() as (redis_url, procs), relay_stack(redis_url, sandbox=SLOW) as stack:
        command = procs[0].args
        request_id = submit_without_callback(stack)
        before = eventually(lambda: (p := read_feed(stack)) and len(p["events"]) >= 2 and p)
        cursor = before["next_cursor"]
        # Redis restarts (SIGTERM: it writes its AOF out and exits), from the same files.
        procs[0].terminate()
        procs[0].wait(timeout=10)
        procs[0] = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        eventually(lambda: answers(redis_url))
        # What was there is still there, and the cursor still marks the same place.
        assert eventually(lambda: read_feed(stack)["events"]) == before["events"]
        assert read_feed(stack, cursor)["events"] == []
        pin(stack, request_id, status="completed")
        after = eventually(lambda: (p := read_feed(stack, cursor, wait="5")) and p["events"] and p)
        assert [event["status"] for event in after["events"]] == ["completed"]
        assert after["events"][0]["sequence"] == before["events"][-1]["sequence"] + 1
