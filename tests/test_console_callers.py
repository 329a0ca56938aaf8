"""The console per caller (#20): a caller's key shows that caller's jobs and deliveries only, and
steers only those; an admin's shows everyone's, with a caller column and filter; every sign-in
is logged with the caller's name (never the key)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ADMIN_KEY, B_KEY, csrf_of, sign_in, submit_as, three_callers
from tests.stack import RELAY_KEY, Receiver, Stack, eventually, relay_stack


@pytest.fixture
def stack(redis_url: str, tmp_path: Path) -> Iterator[Stack]:
    # Every callback fails for good at its one attempt: each job shows on the failed page.
    receiver = Receiver(default=500)
    env = {**three_callers(tmp_path / "callers.json"), "RELAY_DELIVERY_RETRY_SCHEDULE": "0"}
    with relay_stack(redis_url, receiver=receiver, env=env) as stack:
        yield stack


def link(request_id: str) -> str:
    return f'href="/console/jobs/{request_id}"'


def jobs_of_both(stack: Stack) -> tuple[str, str]:
    a_job = submit_as(stack, RELAY_KEY, "a-episode-1")
    b_job = submit_as(stack, B_KEY, "b-episode-1")
    stack.receiver.wait_for(2)
    return a_job, b_job


def test_a_callers_console_shows_and_steers_its_own_jobs_only(stack: Stack) -> None:
    a_job, b_job = jobs_of_both(stack)
    client = sign_in(stack, RELAY_KEY)
    listed = client.get("/console/jobs").text
    assert a_job in listed and b_job not in listed
    assert "team-b" not in listed
    # Found by id or reference_id: its own only; another caller's is as if it did not exist.
    assert a_job in client.get("/console/jobs", params={"q": "a-episode-1"}).text
    assert b_job not in client.get("/console/jobs", params={"q": "b-episode-1"}).text
    by_id = client.get("/console/jobs", params={"q": b_job}).text
    assert link(b_job) not in by_id and "No tracked job has the id" in by_id
    assert client.get(f"/console/jobs/{a_job}").status_code == 200
    assert client.get(f"/console/jobs/{b_job}").status_code == 404
    failed = eventually(
        lambda: a_job in (text := client.get("/console/deliveries/failed").text) and text
    )
    assert b_job not in failed
    token = csrf_of(failed)
    redeliver = client.post(
        f"/console/jobs/{b_job}/redeliver", data={"csrf": token, "confirm": "yes"}
    )
    assert redeliver.status_code == 404
    # Its recover requeues its own failed delivery, not the other caller's.
    done = client.post(
        "/console/deliveries/recover",
        data={"csrf": token, "since": "2020-01-01T00:00:00Z", "limit": "10"},
    )
    assert done.status_code == 200 and "Requeued 1 deliveries" in done.text
    # Whose jobs are shown is not a caller's to choose.
    assert b_job not in client.get("/console/jobs", params={"caller": "team-b"}).text
    assert b_job not in client.get("/console/deliveries/failed", params={"caller": "team-b"}).text


def test_an_admins_console_shows_every_caller_with_a_filter(stack: Stack) -> None:
    a_job, b_job = jobs_of_both(stack)
    client = sign_in(stack, ADMIN_KEY)
    listed = client.get("/console/jobs").text
    assert a_job in listed and b_job in listed
    assert '<th scope="col">Caller</th>' in listed
    assert "team-a" in listed and "team-b" in listed
    only_b = client.get("/console/jobs", params={"caller": "team-b"}).text
    assert b_job in only_b and a_job not in only_b
    assert client.get(f"/console/jobs/{b_job}").status_code == 200
    failed = eventually(
        lambda: (
            all(
                job in (text := client.get("/console/deliveries/failed").text)
                for job in (a_job, b_job)
            )
            and text
        )
    )
    assert "team-b" in failed
    failed_b = client.get("/console/deliveries/failed", params={"caller": "team-b"}).text
    assert b_job in failed_b and a_job not in failed_b
    assert client.get("/console/jobs", params={"caller": "Not A Name!"}).status_code == 400


def test_every_console_sign_in_is_logged_with_the_callers_name(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="relay.console"):
        sign_in(stack, RELAY_KEY)
        sign_in(stack, ADMIN_KEY)
    signed_in = [r for r in caplog.records if r.getMessage() == "console sign-in"]
    assert [(r.__dict__["caller"], r.__dict__["role"]) for r in signed_in] == [
        ("team-a", "caller"),
        ("oncall", "admin"),
    ]
    assert not any(
        key in record.getMessage() or key in str(record.__dict__)
        for record in caplog.records
        for key in (RELAY_KEY, ADMIN_KEY)
    )
