"""Callers sharing the upstream budget, and held to their own limits, through the API: the
official SDK as two callers in front of the sandbox, on a real Redis. What is checked is the
order Chamelaion created the jobs in and who got which 429, never how long anything took."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from chamelaion import Chamelaion, RateLimitError

from relay.sandbox import SandboxConfig
from tests.helpers import (
    AUDIO,
    MULTIPART,
    UPLOAD,
    VIDEO,
    Api,
    audio,
    callers_env,
    form,
    pin,
    running_api,
    video,
)
from tests.stack import RELAY_KEY, SANDBOX_KEY, eventually, relay_stack

OTHER_KEY = "team-b-key-0123456789abcdef"


def sdk(url: str, key: str) -> Chamelaion:
    return Chamelaion(api_key=key, base_url=url + "/api", max_retries=0, timeout=60)


def submit(client: Chamelaion, callback_url: str | None = None) -> str:
    extra = {"callback_url": callback_url} if callback_url else None
    return client.lipsync.generate(
        inputs=[{"type": "video", "url": VIDEO}, {"type": "audio", "url": AUDIO}],
        extra_body=extra,
    ).request_id


def created(sandbox_url: str) -> list[str]:
    """Every job the sandbox created, in the order it created them (every job takes as long,
    so they finish in that order)."""
    finishes: dict[str, float] = httpx.get(sandbox_url + "/_sandbox/finishes").json()
    return sorted(finishes, key=finishes.__getitem__)


def teams(path: Path, **team_b: object) -> dict[str, str]:
    """team-a holds RELAY_KEY, team-b OTHER_KEY (with `team_b`'s fields); equal shares."""
    return callers_env(
        path,
        {"name": "team-a", "keys": [RELAY_KEY]},
        {"name": "team-b", "keys": [OTHER_KEY], **team_b},
    )


@pytest.fixture
def flooded(redis_url: str, tmp_path: Path) -> Iterator[tuple[Api, list[str]]]:
    """The API at 5 calls/s (4 for the API), a call waiting up to 30 s, and team-a flooding it
    from 12 threads until the test ends; yields the API and team-a's job ids so far."""
    env = teams(tmp_path / "callers.json")
    with running_api(
        redis_url, RELAY_UPSTREAM_RATE_LIMIT="5", RELAY_API_BUDGET_WAIT="30", **env
    ) as api:
        flooding = threading.Event()
        flooding.set()
        ids: list[str] = []

        def flood() -> None:
            client = sdk(api.url, RELAY_KEY)
            while flooding.is_set():
                with contextlib.suppress(RateLimitError):
                    ids.append(submit(client))
            client.close()

        threads = [threading.Thread(target=flood) for _ in range(12)]
        for thread in threads:
            thread.start()
        try:
            yield api, ids
        finally:
            flooding.clear()
            for thread in threads:
                thread.join()


def test_a_flood_does_not_starve_another_callers_submissions(
    flooded: tuple[Api, list[str]],
) -> None:
    api, flood_ids = flooded
    # The flood's 12 calls wait in the queue all along: 4 slots a second for 12 callers.
    eventually(lambda: len(flood_ids) >= 8, timeout=60)
    client = sdk(api.url, OTHER_KEY)
    ahead = []
    for _ in range(3):
        before = set(created(api.sandbox_url))
        mine = submit(client)
        order = created(api.sandbox_url)
        ahead.append(sum(1 for rid in order[: order.index(mine)] if rid not in before))
    client.close()
    # First come, first served, each of team-b's calls would wait behind the flood's calls
    # queued before it (about 10). With equal shares, it waits behind those already given a
    # slot of the lookahead (2) and one of the same tag, at most.
    assert max(ahead) <= 4, f"the flood's jobs created before each of team-b's: {ahead}"
    assert len(flood_ids) > 8, "and the flood went on meanwhile"


def test_submit_rate_answers_429_naming_the_limit(redis_url: str, tmp_path: Path) -> None:
    env = teams(tmp_path / "callers.json", submit_rate=1)
    with running_api(redis_url, **env) as api:
        b = sdk(api.url, OTHER_KEY)
        submit(b)
        with pytest.raises(RateLimitError) as refused:
            submit(b)
        answer = refused.value.response
        assert 1 <= int(answer.headers["retry-after"]) <= 2
        message = answer.json()["error"]
        assert "submit_rate" in message and "team-b" in message
        # The limit is team-b's own: team-a submits as it likes.
        a = sdk(api.url, RELAY_KEY)
        for _ in range(3):
            submit(a)
        a.close()
        b.close()
        # And a refused submission sent nothing upstream.
        assert api.upstream_calls("POST /v1/lipsync/generate") == 4


def test_an_upload_is_held_to_its_callers_submit_rate(redis_url: str, tmp_path: Path) -> None:
    env = teams(tmp_path / "callers.json", submit_rate=1)
    with running_api(redis_url, **env) as api:

        def upload() -> httpx.Response:
            return httpx.post(
                api.url + UPLOAD,
                content=form(video(), audio()),
                headers={"x-api-key": OTHER_KEY, "content-type": MULTIPART},
                timeout=60,
            )

        assert upload().status_code == 200
        refused = upload()
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert "submit_rate" in refused.json()["error"]
        assert api.upstream_calls("POST /v1/lipsync/generate-with-media") == 1


def test_max_outstanding_answers_429_until_a_job_ends(redis_url: str, tmp_path: Path) -> None:
    # team-b sets its own cap (2); team-a has the global one (RELAY_CALLER_MAX_OUTSTANDING, 3).
    env = teams(tmp_path / "callers.json", max_outstanding=2)
    env["RELAY_CALLER_MAX_OUTSTANDING"] = "3"
    # Jobs stay queued until the test ends one.
    config = SandboxConfig(api_keys=(SANDBOX_KEY,), queued_seconds=600, processing_seconds=600)
    with relay_stack(redis_url, sandbox=config, env=env) as stack:
        b = sdk(stack.api_url, OTHER_KEY)
        held = [submit(b, stack.callback_url) for _ in range(2)]
        with pytest.raises(RateLimitError) as refused:
            submit(b, stack.callback_url)
        answer = refused.value.response
        assert int(answer.headers["retry-after"]) >= 1
        message = answer.json()["error"]
        assert "max_outstanding" in message and "team-b" in message and " 2 " in message
        a = sdk(stack.api_url, RELAY_KEY)
        for _ in range(3):
            submit(a, stack.callback_url)
        with pytest.raises(RateLimitError) as global_cap:
            submit(a, stack.callback_url)
        assert "team-a" in global_cap.value.response.json()["error"]
        # One of team-b's jobs ends (its callback sent): team-b may submit one more, and only.
        pin(stack, held[0], status="completed")
        stack.receiver.wait_for(1, timeout=30)
        submit(b, stack.callback_url)
        with pytest.raises(RateLimitError):
            submit(b, stack.callback_url)
        a.close()
        b.close()
