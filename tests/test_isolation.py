"""Callers as tenants, step two: a caller sees and steers only its own jobs (#20), and a watch
cannot take another team's job (#24, finding 5).

Two callers (`team-a`, `team-b`) and an admin (`oncall`) on one relay, each with the official
SDK: every route tried with another caller's request id and reference_id answers exactly as
for a job that does not exist.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import chamelaion
import httpx
import pytest
from chamelaion import Chamelaion

from relay.jobs.intents import Intents
from relay.jobs.store import JobStore
from relay.redis.conn import connect
from relay.settings import Settings
from tests.helpers import AUDIO, VIDEO, callers_env
from tests.stack import RELAY_KEY, Stack, eventually, relay_stack

B_KEY = "team-b-key-0123456789abcdef"
ADMIN_KEY = "oncall-admin-key-0123456789"
RELAY_API = "/api/relay/v1"
NOT_FOUND = {"error": "no tracked job has this id or reference_id"}


def teams(path: Path) -> dict[str, str]:
    return callers_env(
        path,
        {"name": "team-a", "keys": [RELAY_KEY]},
        {"name": "team-b", "keys": [B_KEY]},
        {"name": "oncall", "keys": [ADMIN_KEY], "role": "admin"},
    )


@pytest.fixture
def stack(redis_url: str, tmp_path: Path) -> Iterator[Stack]:
    with relay_stack(redis_url, env=teams(tmp_path / "callers.json")) as stack:
        yield stack


def sdk(stack: Stack, key: str) -> Chamelaion:
    return Chamelaion(api_key=key, base_url=stack.api_url + "/api", max_retries=0)


def submit_as(stack: Stack, key: str, reference_id: str, *, callback: bool = True) -> str:
    extra = {"callback_url": stack.callback_url} if callback else {}
    result = sdk(stack, key).lipsync.generate(
        inputs=[{"type": "video", "url": VIDEO}, {"type": "audio", "url": AUDIO}],
        reference_id=reference_id,
        extra_body=extra,
    )
    return result.request_id


def call(stack: Stack, key: str, method: str, path: str, body: object = None) -> httpx.Response:
    return httpx.request(
        method, stack.api_url + path, json=body, headers={"x-api-key": key}, timeout=30
    )


def direct_job(stack: Stack, reference_id: str) -> str:
    """A job created at Chamelaion without the relay."""
    body = {
        "inputs": [{"type": "video", "url": VIDEO}, {"type": "audio", "url": AUDIO}],
        "reference_id": reference_id,
    }
    request_id: str = stack.upstream("POST", "/api/v1/lipsync/generate", json=body).json()[
        "request_id"
    ]
    return request_id


# --- #24 finding 5: watches -------------------------------------------------------------------


def watch(stack: Stack, key: str, **body: object) -> httpx.Response:
    return call(
        stack, key, "POST", RELAY_API + "/watches", {"callback_url": stack.callback_url, **body}
    )


def test_a_caller_cannot_watch_a_job_submitted_elsewhere(stack: Stack) -> None:
    # The finding: any key's watch of another team's reference_id got 201, then its callback
    # with the output_url; the owner's own watch afterwards got 409.
    request_id = direct_job(stack, "payroll-video-1")
    for name in ({"reference_id": "payroll-video-1"}, {"request_id": request_id}):
        refused = watch(stack, B_KEY, **name)
        assert refused.status_code == 404, refused.text
        assert refused.json() == NOT_FOUND
    assert (
        call(stack, ADMIN_KEY, "GET", f"/api/v1/lipsync/requests/{request_id}").json()["id"]
        == request_id
    )
    # An admin may watch it (for itself, or for the caller it belongs to).
    watched = watch(stack, ADMIN_KEY, request_id=request_id, caller="team-a")
    assert watched.status_code == 201, watched.text
    mine = call(stack, RELAY_KEY, "GET", f"/api/v1/lipsync/requests/{request_id}")
    assert mine.status_code == 200, "watched for team-a: team-a sees it"
    stack.receiver.wait_for(1)


def test_a_caller_cannot_watch_another_callers_job(stack: Stack) -> None:
    request_id = submit_as(stack, RELAY_KEY, "dub-7")
    for name in ({"reference_id": "dub-7"}, {"request_id": request_id}):
        refused = watch(stack, B_KEY, **name)
        assert refused.status_code == 404, refused.text
        assert refused.json() == NOT_FOUND
    # Its owner watching it again with its own callback is the idempotent answer.
    assert watch(stack, RELAY_KEY, request_id=request_id).status_code == 200


def test_no_watch_takes_a_job_whose_submission_is_being_settled(
    stack: Stack, redis_url: str
) -> None:
    # A submission whose create answer was lost: its intent is open while the relay looks for
    # its job. A watch must not take the job from its real submitter.
    request_id = direct_job(stack, "dub-lost")

    async def open_intent() -> None:
        redis = connect(redis_url, timeout=5)
        intents = Intents(redis, JobStore(redis), Settings.model_validate({}))
        await intents.open(
            reference_id="dub-lost",
            idempotency_key=None,
            callback_url=stack.callback_url,
            events=None,
            metadata=None,
            caller="team-a",
        )
        await redis.aclose()

    asyncio.run(open_intent())
    for name in ({"reference_id": "dub-lost"}, {"request_id": request_id}):
        refused = watch(stack, ADMIN_KEY, **name)
        assert refused.status_code == 409, refused.text
        assert "being settled" in refused.json()["error"]


@pytest.mark.parametrize("name", [".", "..", "%2e%2e", "a/b"])
@pytest.mark.parametrize("field", ["request_id", "reference_id"])
def test_watch_names_get_the_path_segment_check(stack: Stack, name: str, field: str) -> None:
    # The finding: request_id "." reached the upstream list route, ".." GET /api/v1/lipsync.
    before = stack.upstream("GET", "/_sandbox/stats").json()["calls"]
    refused = watch(stack, ADMIN_KEY, **{field: name})
    assert refused.status_code == 400, refused.text
    assert stack.upstream("GET", "/_sandbox/stats").json()["calls"] == before


# --- #20: every route, with another caller's id and reference_id ----------------------------


def test_every_route_answers_another_callers_job_as_a_missing_one(stack: Stack) -> None:
    mine = submit_as(stack, RELAY_KEY, "shared-ref")
    stack.receiver.wait_for(1)
    eventually(
        lambda: (
            call(stack, RELAY_KEY, "GET", f"{RELAY_API}/jobs/{mine}/deliveries").json()[
                "deliveries"
            ][0]["state"]
            == "delivered"
        )
    )
    routes = [
        ("GET", "/api/v1/lipsync/requests/{}"),
        ("GET", RELAY_API + "/jobs/{}/deliveries"),
        ("POST", RELAY_API + "/jobs/{}/redeliver"),
    ]
    for method, route in routes:
        for name in (mine, "shared-ref"):
            other = call(stack, B_KEY, method, route.format(name))
            missing = call(stack, B_KEY, method, route.format("no-such-job"))
            assert other.status_code == missing.status_code == 404, (route, other.text)
            assert other.content == missing.content, route
            assert mine not in other.text
    # The SDK sees a not-found, as for any id it does not know.
    with pytest.raises(chamelaion.NotFoundError):
        sdk(stack, B_KEY).lipsync.requests.retrieve(mine)
    # The owner and the admin see it, by id and by reference_id.
    for key in (RELAY_KEY, ADMIN_KEY):
        for name in (mine, "shared-ref"):
            assert sdk(stack, key).lipsync.requests.retrieve(name).id == mine
    # The redeliver refused to team-b sent nothing: still one callback.
    assert call(stack, RELAY_KEY, "POST", f"{RELAY_API}/jobs/{mine}/redeliver").status_code == 202
    assert len(stack.receiver.wait_for(2)) == 2


def test_two_callers_may_use_the_same_reference_id(stack: Stack) -> None:
    a = submit_as(stack, RELAY_KEY, "episode-42", callback=False)
    b = submit_as(stack, B_KEY, "episode-42", callback=False)
    assert a != b
    assert sdk(stack, RELAY_KEY).lipsync.requests.retrieve("episode-42").id == a
    assert sdk(stack, B_KEY).lipsync.requests.retrieve("episode-42").id == b


def test_the_list_route_shows_a_caller_its_own_jobs_in_chamelaions_shape(stack: Stack) -> None:
    a_jobs = [submit_as(stack, RELAY_KEY, f"a-{n}", callback=False) for n in range(3)]
    b_job = submit_as(stack, B_KEY, "b-0", callback=False)
    direct = direct_job(stack, "elsewhere")
    page = sdk(stack, RELAY_KEY).lipsync.requests.list(limit=2)
    assert [row.id for row in page.data] == a_jobs[::-1][:2], "newest first"
    assert (page.pagination.limit, page.pagination.offset, page.pagination.total) == (2, 0, 3)
    rest = sdk(stack, RELAY_KEY).lipsync.requests.list(limit=2, offset=2)
    assert [row.id for row in rest.data] == [a_jobs[0]]
    by_ref = sdk(stack, RELAY_KEY).lipsync.requests.list(reference_id="a-1")
    assert [row.id for row in by_ref.data] == [a_jobs[1]]
    assert [row.id for row in sdk(stack, B_KEY).lipsync.requests.list().data] == [b_job]
    assert sdk(stack, B_KEY).lipsync.requests.list(reference_id="a-1").data == []
    # The admin: Chamelaion's whole list as before, or one caller's with a filter.
    everything = {row.id for row in sdk(stack, ADMIN_KEY).lipsync.requests.list(limit=100).data}
    assert everything >= {*a_jobs, b_job, direct}
    filtered = call(stack, ADMIN_KEY, "GET", "/api/v1/lipsync/requests?caller=team-b").json()
    assert [row["id"] for row in filtered["data"]] == [b_job]
    # A caller cannot name another.
    assert call(stack, B_KEY, "GET", "/api/v1/lipsync/requests?caller=team-a").status_code == 403


def test_deliveries_and_recover_touch_only_the_callers_own(stack: Stack) -> None:
    stack.receiver.default = 500  # every callback fails, then is given up
    a_job = submit_as(stack, RELAY_KEY, "fails-a")
    b_job = submit_as(stack, B_KEY, "fails-b")

    def failed(key: str) -> set[str]:
        found = call(stack, key, "GET", f"{RELAY_API}/deliveries?state=failed").json()
        return {row["request_id"] for row in found["data"]}

    eventually(lambda: failed(ADMIN_KEY) == {a_job, b_job}, timeout=30)
    assert failed(RELAY_KEY) == {a_job}
    assert failed(B_KEY) == {b_job}
    admin_b = call(stack, ADMIN_KEY, "GET", f"{RELAY_API}/deliveries?state=failed&caller=team-b")
    assert {row["request_id"] for row in admin_b.json()["data"]} == {b_job}
    recovered = call(stack, B_KEY, "POST", f"{RELAY_API}/deliveries/recover", {"since": 0})
    assert recovered.json()["requeued"] == 1
    assert failed(RELAY_KEY) == {a_job}, "team-a's delivery was left alone"
    attempts_of_a = call(stack, RELAY_KEY, "GET", f"{RELAY_API}/jobs/{a_job}/deliveries").json()
    assert all(
        entry.get("note") != "recovered in bulk"
        for entry in attempts_of_a["deliveries"][0]["attempts"]
    )
    assert attempts_of_a["audit"] == []
    audit_of_b = call(stack, B_KEY, "GET", f"{RELAY_API}/jobs/{b_job}/deliveries").json()["audit"]
    assert [(entry["caller"], entry["action"]) for entry in audit_of_b] == [("team-b", "recover")]
