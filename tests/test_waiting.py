"""`Prefer: wait` on status reads and submissions: answered when the job ends or when the wait
is up, many waiters on one job, a client that hangs up, the API restarted under a waiter."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from chamelaion import Chamelaion
from prometheus_client.parser import text_string_to_metric_families

from relay.api.app import create_app
from relay.serving import api_options
from relay.settings import load_settings
from tests.helpers import (
    ADMIN_KEY,
    AUDIO,
    B_KEY,
    SLOW,
    VIDEO,
    pin,
    running_api,
    submit,
    three_callers,
)
from tests.servers import serve
from tests.stack import RELAY_KEY, Stack, eventually, job_field, relay_stack

WAIT_ROUTE = "/api/v1/lipsync/requests/{}"


def waiting(api_url: str, kind: str = "wait") -> float:
    """How many requests the API holds open for job events (relay_api_waiting)."""
    text = httpx.get(api_url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "relay_api_waiting" and sample.labels.get("kind") == kind:
                return sample.value
    return 0.0


def sdk(api_url: str) -> Chamelaion:
    return Chamelaion(api_key=RELAY_KEY, base_url=api_url + "/api", max_retries=0, timeout=120)


def retrieve(api_url: str, request_id: str, prefer: str) -> tuple[dict[str, Any], str | None]:
    """A status read with `Prefer` through the SDK: the job and Preference-Applied."""
    raw = sdk(api_url).lipsync.requests.with_raw_response.retrieve(
        request_id, extra_headers={"Prefer": prefer}
    )
    return raw.parse().model_dump(mode="json"), raw.headers.get("preference-applied")


def polled(stack: Stack, request_id: str) -> None:
    """Wait until the relay has read the job from upstream once (it then has a body)."""
    eventually(lambda: job_field(stack.env["RELAY_REDIS_URL"], request_id, "body"))


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=32) as executor:
        yield executor


def test_a_wait_is_answered_when_the_job_ends(redis_url: str, pool: ThreadPoolExecutor) -> None:
    with relay_stack(redis_url, sandbox=SLOW) as stack:
        request_id = submit(stack)
        polled(stack, request_id)
        answer = pool.submit(retrieve, stack.api_url, request_id, "wait=60")
        eventually(lambda: waiting(stack.api_url) == 1)
        assert not answer.done()
        pin(
            stack,
            request_id,
            status="completed",
            extra={"output_url": "https://cdn.example.com/out.mp4"},
        )
        job, applied = answer.result(timeout=30)
        assert job["status"] == "completed"
        assert job["output_url"] == "https://cdn.example.com/out.mp4"
        assert applied == "wait=60"
        eventually(lambda: waiting(stack.api_url) == 0)


def test_a_wait_that_runs_out_answers_with_the_job_as_it_stands(
    redis_url: str, pool: ThreadPoolExecutor
) -> None:
    with relay_stack(redis_url, sandbox=SLOW) as stack:
        request_id = submit(stack)
        polled(stack, request_id)
        job, applied = retrieve(stack.api_url, request_id, "respond-async, wait=1")
        assert job["status"] == "queued"
        assert applied == "wait=1"
        # Past RELAY_MAX_WAIT it is capped, and says so; `wait` alone is the cap.
        capped = httpx.get(
            stack.api_url + WAIT_ROUTE.format(request_id),
            headers={"x-api-key": RELAY_KEY, "Prefer": "wait=0"},
        )
        assert capped.headers["preference-applied"] == "wait=0"


def test_many_waiters_on_one_job_all_hear_its_end(redis_url: str, pool: ThreadPoolExecutor) -> None:
    with relay_stack(redis_url, sandbox=SLOW) as stack:
        request_id = submit(stack)
        polled(stack, request_id)
        answers = [pool.submit(retrieve, stack.api_url, request_id, "wait=60") for _ in range(30)]
        eventually(lambda: waiting(stack.api_url) == 30)
        pin(stack, request_id, status="failed", extra={"error_message": "the audio is silent"})
        results = [answer.result(timeout=30) for answer in answers]
        assert {job["status"] for job, _ in results} == {"failed"}
        assert {applied for _, applied in results} == {"wait=60"}


def without_date(response: httpx.Response) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, value in response.headers.raw if name.lower() != b"date"]


def test_a_waiting_answer_is_the_ordinary_answer_byte_for_byte(
    redis_url: str, pool: ThreadPoolExecutor
) -> None:
    with relay_stack(redis_url, sandbox=SLOW) as stack:
        request_id = submit(stack)
        polled(stack, request_id)
        url = stack.api_url + WAIT_ROUTE.format(request_id)
        wait = {"x-api-key": RELAY_KEY, "Prefer": "wait=60"}
        with httpx.Client(timeout=60) as client:
            waited = pool.submit(client.get, url, headers=wait)
            eventually(lambda: waiting(stack.api_url) == 1)
            pin(stack, request_id, status="completed", extra={"output_url": "https://cdn/o.mp4"})
            answer = waited.result(timeout=30)
            # The client's connection carries its next requests: answered by the route itself
            # now that the job has ended, with and without the preference.
            again = client.get(url, headers=wait)
            plain = client.get(url, headers={"x-api-key": RELAY_KEY})
        assert answer.status_code == again.status_code == plain.status_code == 200
        assert answer.json()["status"] == "completed"
        assert answer.content == again.content == plain.content
        assert without_date(answer) == without_date(again)
        assert answer.headers["preference-applied"] == "wait=60"


def test_a_caller_waits_only_on_its_own_jobs(redis_url: str, tmp_path: Path) -> None:
    env = three_callers(tmp_path / "callers.json")
    with relay_stack(redis_url, sandbox=SLOW, env=env) as stack:
        request_id = submit(stack)
        polled(stack, request_id)
        url = stack.api_url + WAIT_ROUTE.format(request_id)
        # Another caller is told at once what it is told without waiting: no such job.
        for prefer in ("wait=60", None):
            headers = {"x-api-key": B_KEY, **({"Prefer": prefer} if prefer else {})}
            refused = httpx.get(url, headers=headers, timeout=30)
            assert refused.status_code == 404
            assert "preference-applied" not in refused.headers
        assert waiting(stack.api_url) == 0
        # An admin may wait on anyone's job.
        job = httpx.get(url, headers={"x-api-key": ADMIN_KEY, "Prefer": "wait=1"}, timeout=30)
        assert job.status_code == 200 and job.headers["preference-applied"] == "wait=1"


def test_a_submission_waits_for_its_job(redis_url: str, pool: ThreadPoolExecutor) -> None:
    with relay_stack(redis_url, sandbox=SLOW) as stack:

        def generate() -> tuple[Any, str | None]:
            raw = sdk(stack.api_url).lipsync.with_raw_response.generate(
                inputs=[{"type": "video", "url": VIDEO}, {"type": "audio", "url": AUDIO}],
                extra_body={"callback_url": stack.callback_url},
                extra_headers={"Prefer": "wait=60", "Idempotency-Key": "wait-1"},
            )
            return raw.parse(), raw.headers.get("preference-applied")

        answer: Future[tuple[Any, str | None]] = pool.submit(generate)
        eventually(lambda: waiting(stack.api_url) == 1)
        [row] = stack.upstream("GET", "/api/v1/lipsync/requests").json()["data"]
        request_id = row["id"]
        pin(
            stack,
            request_id,
            status="completed",
            extra={"output_url": "https://cdn.example.com/o.mp4"},
        )
        created, applied = answer.result(timeout=30)
        assert created.status == "success" and created.request_id == request_id
        assert created.request["status"] == "completed"  # the job, beside the create's answer
        assert applied == "wait=60"
        # A replay of its Idempotency-Key waits the same way, and finds the job ended.
        replayed, _ = generate()
        assert replayed.request_id == request_id
        assert replayed.request["output_url"] == "https://cdn.example.com/o.mp4"


def test_a_submission_that_waits_no_time_answers_with_its_new_job(redis_url: str) -> None:
    with running_api(redis_url) as api:
        body = {"inputs": [{"type": "video", "url": VIDEO}, {"type": "audio", "url": AUDIO}]}
        created = api.post(body, Prefer="wait=0")
        plain = api.post(body)
        assert created.status_code == plain.status_code == 200
        assert created.headers["preference-applied"] == "wait=0"
        answer = created.json()
        assert answer["status"] == "success" and answer.keys() == plain.json().keys()
        assert len(api.tracked()) == 2


def test_a_bad_wait_is_refused_before_anything_is_created(redis_url: str) -> None:
    with running_api(redis_url) as api:
        refused = api.post(
            {"inputs": [{"type": "video", "url": VIDEO}, {"type": "audio", "url": AUDIO}]},
            Prefer="wait=soon",
        )
        assert refused.status_code == 400
        assert "Prefer: wait" in refused.json()["error"]
        assert api.upstream_calls("POST /v1/lipsync/generate") == 0
        assert api.tracked() == []


def test_a_waiter_whose_client_hangs_up_is_let_go(redis_url: str) -> None:
    with relay_stack(redis_url, sandbox=SLOW) as stack:
        request_id = submit(stack)
        polled(stack, request_id)
        gone = threading.Event()

        def hang_up_soon() -> None:
            try:
                httpx.get(
                    stack.api_url + WAIT_ROUTE.format(request_id),
                    headers={"x-api-key": RELAY_KEY, "Prefer": "wait=60"},
                    timeout=httpx.Timeout(5, read=1.5),
                )
            except httpx.ReadTimeout:
                gone.set()  # the client closes its connection

        thread = threading.Thread(target=hang_up_soon)
        thread.start()
        eventually(lambda: waiting(stack.api_url) == 1)
        thread.join()
        assert gone.is_set()
        # Let go well before its 60 s were up.
        eventually(lambda: waiting(stack.api_url) == 0, timeout=10)


def test_an_api_shut_down_under_a_waiter_answers_it_cleanly(
    redis_url: str, pool: ThreadPoolExecutor
) -> None:
    with relay_stack(redis_url, sandbox=SLOW) as stack:
        request_id = submit(stack)
        polled(stack, request_id)
        env = {k: v for k, v in stack.env.items() if k.startswith(("RELAY_", "CHAMELAION_"))}
        settings = load_settings(**{**env, "RELAY_SHUTDOWN_TIMEOUT": "30"})
        restarted: Callable[[], Any] = lambda: serve(  # noqa: E731
            create_app(settings), **api_options(settings)
        )
        with restarted() as api_url:
            url = api_url + WAIT_ROUTE.format(request_id)
            headers = {"x-api-key": RELAY_KEY, "Prefer": "wait=60"}
            answer = pool.submit(httpx.get, url, headers=headers, timeout=120)
            eventually(lambda: waiting(api_url) == 1)
            # Leaving the block shuts the server down, with the waiter still waiting.
        response: httpx.Response = answer.result(timeout=1)
        # A whole answer (the job as it stands) and a clean close, long before the 30 s grace.
        assert response.status_code == 200
        assert response.json()["status"] == "queued"
        assert response.headers["connection"] == "close"
        # The client asks again, of the API that came back (here: the stack's), and hears the end.
        retry = pool.submit(retrieve, stack.api_url, request_id, "wait=60")
        eventually(lambda: waiting(stack.api_url) == 1)
        pin(stack, request_id, status="completed")
        assert retry.result(timeout=30)[0]["status"] == "completed"
