"""Lost answers to creates (issue #11, finding 7): found and adopted, or said so; never doubled.

Chamelaion has no idempotency key and the official SDK retries POSTs on 5xx and timeouts. Each
test uses the SDK with its default retries on, against the sandbox made to lose an answer: a
job created and then answered 500, an answer slower than RELAY_UPSTREAM_TIMEOUT, a Redis that
refuses the tracking write, an API process killed mid-create.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any, cast

import httpx
import pytest
import redis
from chamelaion import APIConnectionError, APIStatusError, Chamelaion
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from relay.devtools.ports import free_port
from relay.redis import keys
from relay.sandbox import SandboxConfig
from tests.helpers import verified
from tests.servers import own_redis, serve
from tests.stack import RELAY_KEY, SANDBOX_KEY, Stack, eventually, job_field, relay_stack, serving

INPUTS = [
    {"type": "video", "url": "https://cdn.example.com/v.mp4"},
    {"type": "audio", "url": "https://cdn.example.com/a.wav"},
]
# Quick reconciles and short upstream timeouts, so lost answers settle within a test.
ENV = {
    "RELAY_INTENT_RECONCILE_INTERVAL": "0.5",
    "RELAY_UPSTREAM_TIMEOUT": "2",
    "RELAY_API_BUDGET_WAIT": "0.5",
    "RELAY_REDIS_TIMEOUT": "1",
}
CREATED_THEN_500 = {"status": 500, "when": "after", "paths": "generate", "count": 1}


class LateAnswers:
    """A hop between the relay and the sandbox for the next create: Chamelaion working on
    while its caller waits. `before`: seconds before the create reaches the sandbox (it still
    does when the caller has given up: Chamelaion had the whole request); `after`: seconds the
    sandbox's answer is held back once the job exists. Everything else passes straight on.

    (The sandbox's own `delay` fault reads the body after its delay, so a caller that gave up
    meanwhile leaves no job: not what a lost answer is.)"""

    def __init__(self) -> None:
        self.target = ""
        self.before = 0.0
        self.after = 0.0
        self.armed = False
        self.blank = False
        self.headers = 0
        # Set once the held create's job exists upstream and its answer is being held back.
        self.holding = threading.Event()
        self._late: set[asyncio.Task[httpx.Response]] = set()

    def arm(
        self, *, before: float = 0.0, after: float = 0.0, blank: bool = False, headers: int = 0
    ) -> None:
        """`blank`: answer 200 without a request_id at once, and create the job `before`
        seconds later (an answer that says success but cannot be used). `headers`: pass the
        answer on with that many more headers (more than an HTTP client takes)."""
        self.before, self.after, self.armed, self.blank = before, after, True, blank
        self.headers = headers

    def app(self) -> Starlette:
        async def send(request: Request, body: bytes) -> httpx.Response:
            headers = {
                name: value
                for name, value in request.headers.items()
                if name in ("x-api-key", "authorization", "content-type")
            }
            async with httpx.AsyncClient() as http:
                return await http.request(
                    request.method,
                    self.target + request.url.path,
                    params=request.query_params,
                    content=body,
                    headers=headers,
                )

        async def send_later(request: Request, body: bytes) -> httpx.Response:
            await asyncio.sleep(self.before)
            return await send(request, body)

        async def forward(request: Request) -> Response:
            body = await request.body()
            late = self.armed and request.url.path.endswith("/lipsync/generate")
            if late and self.blank:
                self.armed = False
                task = asyncio.ensure_future(send_later(request, body))
                self._late.add(task)
                task.add_done_callback(self._late.discard)
                return Response(b'{"status": "success"}', 200, media_type="application/json")
            if late:
                self.armed = False
                await asyncio.sleep(self.before)
            answer = await send(request, body)
            if late:
                self.holding.set()
                await hold(request, self.after)
            passed = {
                name: value
                for name, value in answer.headers.items()
                if name in ("content-type", "retry-after")
            }
            if late:
                passed |= {f"x-padding-{number}": "x" for number in range(self.headers)}
            return Response(answer.content, answer.status_code, headers=passed)

        return Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST"])])


async def hold(request: Request, seconds: float) -> None:
    """Hold an answer back `seconds`, or until its caller has gone: an answer nobody waits
    for is lost either way, and the hop's server then stops without waiting out the hold."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            # Its body is read: what comes next is the disconnect.
            while (await request.receive())["type"] != "http.disconnect":
                pass


@contextlib.contextmanager
def late_stack(redis_url: str, **env: str) -> Iterator[tuple[Stack, LateAnswers]]:
    """The stack with every upstream call of the relay going through a LateAnswers hop."""
    hop = LateAnswers()
    with (
        serve(hop.app()) as hop_url,
        relay_stack(
            redis_url, env={**ENV, **env, "CHAMELAION_BASE_URL": hop_url + "/api"}
        ) as stack,
    ):
        hop.target = stack.sandbox_url
        yield stack, hop


def client(stack: Stack, url: str | None = None) -> Chamelaion:
    """The official SDK with its default retries (2) and timeout: as a new user has it."""
    return Chamelaion(api_key=RELAY_KEY, base_url=(url or stack.api_url) + "/api")


def generate(sdk: Chamelaion, stack: Stack, **kwargs: Any) -> str:
    headers = kwargs.pop("extra_headers", None)
    result = sdk.lipsync.generate(
        inputs=INPUTS,  # type: ignore[arg-type]
        extra_body={"callback_url": stack.callback_url},
        extra_headers=headers,
        **kwargs,
    )
    assert result.status == "success"
    return result.request_id


def upstream_jobs(stack: Stack, reference_id: str | None = None) -> list[dict[str, Any]]:
    params = {"limit": "1000", **({"reference_id": reference_id} if reference_id else {})}
    rows: list[dict[str, Any]] = stack.upstream(
        "GET", "/api/v1/lipsync/requests", params=params
    ).json()["data"]
    return rows


def generate_calls(stack: Stack) -> int:
    calls: int = (
        stack.upstream("GET", "/_sandbox/stats").json()["calls"].get("POST /v1/lipsync/generate", 0)
    )
    return calls


def tracked(redis_url: str) -> list[str]:
    client_ = redis.Redis.from_url(redis_url)
    try:
        found = cast(list[bytes], client_.keys(keys.job("*")))
        return sorted(k.decode().removeprefix(keys.job("")) for k in found)
    finally:
        client_.close()


def open_intents(redis_url: str) -> int:
    client_ = redis.Redis.from_url(redis_url)
    try:
        return cast(int, client_.zcard(keys.INTENTS))
    finally:
        client_.close()


def called_back_once(stack: Stack, redis_url: str, request_id: str) -> None:
    """The job's callback arrives, and it is the only job called back."""
    eventually(lambda: job_field(redis_url, request_id, "delivery") == b"delivered", timeout=60)
    [callback] = stack.receiver.received
    payload = verified(stack, callback)
    assert payload["type"] == "lipsync.completed"
    assert payload["data"]["id"] == request_id  # type: ignore[index]


def fault(stack: Stack, body: dict[str, Any]) -> None:
    stack.upstream("POST", "/_sandbox/faults", json=body)


def error_code(exc: APIStatusError) -> str:
    code: str = exc.response.json()["details"][0]["code"]
    return code


def test_created_then_500_with_a_reference_id_is_one_job_tracked_once(redis_url: str) -> None:
    with relay_stack(redis_url, env=ENV) as stack:
        fault(stack, CREATED_THEN_500)
        request_id = generate(client(stack), stack, reference_id="episode-1")
        [row] = upstream_jobs(stack, "episode-1")
        assert row["id"] == request_id
        assert generate_calls(stack) == 1
        assert tracked(redis_url) == [request_id]
        assert open_intents(redis_url) == 0
        called_back_once(stack, redis_url, request_id)


def test_created_then_500_with_an_idempotency_key_is_one_job_tracked_once(
    redis_url: str,
) -> None:
    with relay_stack(redis_url, env=ENV) as stack:
        fault(stack, CREATED_THEN_500)
        sdk = client(stack)
        headers = {"Idempotency-Key": "order-42"}
        request_id = generate(sdk, stack, extra_headers=headers)
        [row] = upstream_jobs(stack)
        assert row["id"] == request_id
        assert tracked(redis_url) == [request_id]
        # The same key answers with the same job, and still creates nothing.
        assert generate(sdk, stack, extra_headers=headers) == request_id
        assert generate_calls(stack) == 1
        called_back_once(stack, redis_url, request_id)


def test_an_upload_created_then_500_is_one_job_tracked_once(redis_url: str) -> None:
    with relay_stack(redis_url, env=ENV) as stack:
        fault(stack, {**CREATED_THEN_500, "paths": "POST /v1/lipsync/generate-with-media"})
        result = client(stack).lipsync.generate_with_media(
            video=("v.mp4", b"v" * 4096, "video/mp4"),
            audio=("a.wav", b"a" * 4096, "audio/wav"),
            reference_id="upload-1",
            extra_body={"callback_url": stack.callback_url},
        )
        [row] = upstream_jobs(stack, "upload-1")
        assert row["id"] == result.request_id
        assert tracked(redis_url) == [result.request_id]
        called_back_once(stack, redis_url, result.request_id)


def test_created_then_500_with_neither_says_the_job_may_exist(redis_url: str) -> None:
    with relay_stack(redis_url, env=ENV, workers=0) as stack:
        fault(stack, CREATED_THEN_500)
        with pytest.raises(APIStatusError) as caught:
            generate(client(stack), stack)
        assert caught.value.status_code == 502
        assert caught.value.response.headers["x-should-retry"] == "false"
        assert error_code(caught.value) == "upstream_outcome_unknown"
        assert "may exist" in caught.value.response.json()["error"]
        # No retry made a second job; the one that exists cannot be found by the relay.
        assert generate_calls(stack) == 1
        assert len(upstream_jobs(stack)) == 1
        assert tracked(redis_url) == []


def test_an_answer_lost_to_the_timeout_after_the_create_is_adopted(redis_url: str) -> None:
    with late_stack(redis_url, RELAY_UPSTREAM_TIMEOUT="1") as (stack, hop):
        # The job exists at once; its answer comes 3 s later, after the relay gave up.
        hop.arm(after=3.0)
        request_id = generate(client(stack), stack, reference_id="slow-1")
        [row] = upstream_jobs(stack, "slow-1")
        assert row["id"] == request_id
        assert generate_calls(stack) == 1
        assert tracked(redis_url) == [request_id]
        called_back_once(stack, redis_url, request_id)


def test_a_job_created_after_the_timeout_is_tracked_once_it_appears(redis_url: str) -> None:
    with late_stack(redis_url, RELAY_UPSTREAM_TIMEOUT="1") as (stack, hop):
        # Chamelaion gets to the create 2 s in: the relay gave up, and found nothing yet.
        hop.arm(before=2.0)
        with pytest.raises(APIStatusError) as caught:
            generate(client(stack), stack, reference_id="slow-2")
        assert caught.value.status_code == 502
        assert caught.value.response.headers["x-should-retry"] == "false"
        assert error_code(caught.value) == "upstream_outcome_unknown"
        assert "keeps looking" in caught.value.response.json()["error"]
        [row] = eventually(lambda: upstream_jobs(stack, "slow-2"))
        # A worker finds it and tracks it: its callback comes after all.
        called_back_once(stack, redis_url, row["id"])
        assert generate_calls(stack) == 1
        assert tracked(redis_url) == [row["id"]]
        eventually(lambda: open_intents(redis_url) == 0)


def test_a_success_without_a_request_id_is_never_retried_into_a_second_job(
    redis_url: str,
) -> None:
    with late_stack(redis_url) as (stack, hop):
        # "Success" with no request_id, and the job shows up upstream 2 s later.
        hop.arm(before=2.0, blank=True)
        with pytest.raises(APIStatusError) as caught:
            generate(client(stack), stack, reference_id="blank-1")
        assert caught.value.status_code == 502
        assert caught.value.response.headers["x-should-retry"] == "false"
        assert error_code(caught.value) == "upstream_outcome_unknown"
        [row] = eventually(lambda: upstream_jobs(stack, "blank-1"))
        called_back_once(stack, redis_url, row["id"])
        assert generate_calls(stack) == 1, "the SDK retried into a second job"
        assert tracked(redis_url) == [row["id"]]


def test_a_created_job_whose_answer_cannot_be_parsed_is_adopted_not_created_again(
    redis_url: str,
) -> None:
    # Finding 8 of #24: an answer with 300 headers became a bare 500, which the SDK retried
    # into three upstream jobs.
    with late_stack(redis_url) as (stack, hop):
        hop.arm(headers=300)
        request_id = generate(client(stack), stack, reference_id="framing-1")
        [row] = upstream_jobs(stack, "framing-1")
        assert row["id"] == request_id
        assert generate_calls(stack) == 1
        assert tracked(redis_url) == [request_id]
        called_back_once(stack, redis_url, request_id)


def test_an_unparsable_answer_to_a_create_without_a_handle_says_the_job_may_exist(
    redis_url: str,
) -> None:
    with late_stack(redis_url) as (stack, hop):
        hop.arm(headers=300)
        with pytest.raises(APIStatusError) as caught:
            generate(client(stack), stack)
        assert caught.value.status_code == 502
        assert caught.value.response.headers["x-should-retry"] == "false"
        assert error_code(caught.value) == "upstream_outcome_unknown"
        assert "could not be read" in caught.value.response.json()["error"]
        assert generate_calls(stack) == 1
        assert len(upstream_jobs(stack)) == 1


def test_requests_sharing_the_reference_id_are_not_adopted_by_guess(redis_url: str) -> None:
    with relay_stack(redis_url, env=ENV, workers=0) as stack:
        # Two jobs with this reference_id, made elsewhere just now: any of three could be it.
        for _ in range(2):
            stack.upstream(
                "POST", "/api/v1/lipsync/generate", json={"inputs": INPUTS, "reference_id": "batch"}
            )
        fault(stack, CREATED_THEN_500)
        with pytest.raises(APIStatusError) as caught:
            generate(client(stack), stack, reference_id="batch")
        assert caught.value.status_code == 502
        assert caught.value.response.headers["x-should-retry"] == "false"
        assert error_code(caught.value) == "upstream_outcome_ambiguous"
        ids = {row["id"] for row in upstream_jobs(stack, "batch")}
        assert len(ids) == 3  # no fourth
        assert set(caught.value.response.json()["details"][0]["request_ids"]) == ids
        assert tracked(redis_url) == []


def test_older_requests_with_the_reference_id_are_outside_the_window(redis_url: str) -> None:
    # `history-3` names a request made weeks before: it cannot be this submission's job.
    sandbox = SandboxConfig(
        api_keys=(SANDBOX_KEY,), queued_seconds=0.3, processing_seconds=0.5, history=5
    )
    with relay_stack(redis_url, env=ENV, sandbox=sandbox) as stack:
        fault(stack, CREATED_THEN_500)
        request_id = generate(client(stack), stack, reference_id="history-3")
        assert len(upstream_jobs(stack, "history-3")) == 2
        assert upstream_jobs(stack, "history-3")[0]["id"] == request_id  # the new one
        assert tracked(redis_url) == [request_id]
        called_back_once(stack, redis_url, request_id)


@pytest.mark.long
def test_a_tracking_write_refused_after_the_create_is_recorded_later() -> None:
    with own_redis() as (redis_url, _proc):
        admin = redis.Redis.from_url(redis_url)

        def up() -> bool:
            try:
                return bool(admin.ping())
            except redis.ConnectionError:
                return False

        eventually(up)
        with relay_stack(redis_url, env=ENV) as stack:
            # The create takes 1.5 s; Redis fills up meanwhile (maxmemory under noeviction).
            fault(stack, {"status": None, "delay": 1.5, "paths": "generate", "count": 1})
            outcome: list[BaseException] = []

            def submit() -> None:
                try:
                    generate(client(stack), stack, reference_id="full-1")
                except BaseException as exc:
                    outcome.append(exc)

            thread = threading.Thread(target=submit)
            thread.start()
            eventually(lambda: generate_calls(stack) == 1)
            admin.config_set("maxmemory", "1")
            try:
                thread.join(timeout=30)
            finally:
                admin.config_set("maxmemory", "0")
            [error] = outcome
            assert isinstance(error, APIStatusError)
            assert error.status_code == 503
            assert error.response.headers["x-should-retry"] == "false"
            assert error_code(error) == "job_not_recorded"
            [row] = upstream_jobs(stack, "full-1")
            assert row["id"] in error.response.json()["error"]
            # A worker reconciles the intent written before the create: tracked, called back.
            called_back_once(stack, redis_url, row["id"])
            assert generate_calls(stack) == 1
        admin.close()


# An API process cut off mid-create: the hop holds its create's answer back until the API has
# gone, and the API waits 8 s for it, far longer than the signal takes to come (the test sends
# it as soon as the hop holds the answer) and the 1 s grace on SIGTERM after it. With ENV's 2 s,
# a loaded machine's late signal found the API's own timeout fired: it had adopted the job and
# answered, the relay right and the test raced. The intent it leaves is due for a worker's
# reconcile after 3 x 8 + 8 s (relay.jobs.intents.stale_after); a test that waits for the
# reconcile has it first looked at 10 s after it was written instead (FIRST_LOOK_AFTER_8_S),
# past those 8 s: the API is gone by then.
CUT_OFF_HOLD = 120.0
CUT_OFF_ENV = {"RELAY_SHUTDOWN_TIMEOUT": "1", "RELAY_UPSTREAM_TIMEOUT": "8"}
FIRST_LOOK_AFTER_8_S = {"RELAY_INTENT_FIRST_LOOK": "10"}


@pytest.fixture
def api_process(
    redis_url: str, request: pytest.FixtureRequest
) -> Iterator[tuple[Stack, LateAnswers, subprocess.Popen[bytes], str]]:
    """The API cut off mid-create, as a process; `env` over CUT_OFF_ENV by indirect param."""
    env: dict[str, str] = getattr(request, "param", {})
    with late_stack(redis_url) as (stack, hop):
        port = free_port()
        api = subprocess.Popen(
            [sys.executable, "-m", "relay.cli", "api", "--port", str(port)],
            env={**stack.env, **CUT_OFF_ENV, **env},
        )
        url = f"http://127.0.0.1:{port}"
        try:
            serving(api, url)
            yield stack, hop, api, url
        finally:
            if api.poll() is None:
                api.kill()
            api.wait()


@pytest.mark.long
@pytest.mark.parametrize(
    "api_process", [FIRST_LOOK_AFTER_8_S], indirect=True, ids=["first_look_10"]
)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_an_api_cut_off_mid_create_leaves_the_job_to_a_worker(
    api_process: tuple[Stack, LateAnswers, subprocess.Popen[bytes], str],
    redis_url: str,
    sig: signal.Signals,
) -> None:
    stack, hop, api, url = api_process
    hop.arm(after=CUT_OFF_HOLD)
    outcome: list[BaseException] = []

    def submit() -> None:
        try:
            generate(client(stack, url), stack, reference_id=f"cut-{sig.name}")
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=submit)
    thread.start()
    assert hop.holding.wait(timeout=30), "the create never reached Chamelaion"
    os.kill(api.pid, sig)
    api.wait(timeout=20)
    # Gone before anyone looked for its job: what follows is a worker's doing.
    assert tracked(redis_url) == []
    assert open_intents(redis_url) == 1
    thread.join(timeout=60)
    [error] = outcome
    assert isinstance(error, APIConnectionError | APIStatusError)
    [row] = eventually(lambda: upstream_jobs(stack, f"cut-{sig.name}"))
    called_back_once(stack, redis_url, row["id"])
    assert generate_calls(stack) == 1


def test_an_idempotency_key_cut_off_mid_create_stays_held(
    api_process: tuple[Stack, LateAnswers, subprocess.Popen[bytes], str],
) -> None:
    stack, hop, api, url = api_process
    hop.arm(after=CUT_OFF_HOLD)
    headers = {"Idempotency-Key": "cut-key"}

    def submit() -> None:
        with contextlib.suppress(APIConnectionError, APIStatusError):
            generate(client(stack, url), stack, extra_headers=headers)

    thread = threading.Thread(target=submit)
    thread.start()
    assert hop.holding.wait(timeout=30), "the create never reached Chamelaion"
    api.send_signal(signal.SIGTERM)
    api.wait(timeout=20)
    thread.join(timeout=60)
    # The first create's outcome is unknown: a retry with its key must not make a second job.
    sdk = Chamelaion(api_key=RELAY_KEY, base_url=stack.api_url + "/api", max_retries=0)
    with pytest.raises(APIStatusError) as caught:
        generate(sdk, stack, extra_headers=headers)
    assert caught.value.status_code == 409
    assert generate_calls(stack) == 1


def test_the_apis_creates_spend_the_shared_budget(redis_url: str) -> None:
    with relay_stack(redis_url, env=ENV, workers=0) as stack:
        admin = redis.Redis.from_url(redis_url)
        try:
            generate(client(stack), stack, reference_id="budget-1")
            assert admin.exists(keys.UPSTREAM_TAT), "the create took a slot of the budget"
            # A 429 met by a create pauses every upstream call, the API's own included.
            fault(stack, {"status": 429, "retry_after": 30, "paths": "generate", "count": 1})
            sdk = Chamelaion(api_key=RELAY_KEY, base_url=stack.api_url + "/api", max_retries=0)
            for _ in range(2):
                with pytest.raises(APIStatusError) as caught:
                    generate(sdk, stack, reference_id="budget-2")
                assert caught.value.status_code == 429
                assert 1 <= int(caught.value.response.headers["retry-after"]) <= 30
            assert admin.exists(keys.UPSTREAM_PAUSED)
            assert generate_calls(stack) == 2, "the paused create never reached Chamelaion"
            assert open_intents(redis_url) == 0
        finally:
            admin.close()
