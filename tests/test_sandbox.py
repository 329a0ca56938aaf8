"""The sandbox upstream behaves like Chamelaion to its own SDK and to plain HTTP, over loopback."""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from chamelaion import (
    AuthenticationError,
    BadRequestError,
    Chamelaion,
    InternalServerError,
    NotFoundError,
    RateLimitError,
)
from chamelaion.types.lipsync.lipsync_request import LipsyncRequest
from chamelaion.types.lipsync_generate_params import Input

from relay.sandbox import SandboxConfig, create_sandbox_app
from relay.sandbox.multipart import MultipartError, MultipartParser, PartData, PartEnd, PartStart
from tests.servers import serve

KEY = "sandbox-key"
QUEUED = 0.4
PROCESSING = 0.4
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
POLL = "GET /v1/lipsync/requests/{id}"


@pytest.fixture(scope="module")
def sandbox_url() -> Iterator[str]:
    config = SandboxConfig(queued_seconds=QUEUED, processing_seconds=PROCESSING)
    with serve(create_sandbox_app(config)) as url:
        yield url


# Clients live as long as the server: building one (and its TLS context) per test is slow.
@pytest.fixture(scope="module")
def anon(sandbox_url: str) -> Iterator[httpx.Client]:
    """A client without credentials, for /_sandbox and for the auth checks."""
    with httpx.Client(base_url=sandbox_url) as client:
        yield client


@pytest.fixture(scope="module")
def module_http(sandbox_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sandbox_url, headers={"x-api-key": KEY}) as client:
        yield client


@pytest.fixture(scope="module")
def module_sdk(sandbox_url: str) -> Iterator[Chamelaion]:
    with Chamelaion(api_key=KEY, base_url=f"{sandbox_url}/api", max_retries=0) as client:
        yield client


@pytest.fixture
def base(sandbox_url: str, anon: httpx.Client) -> str:
    """The sandbox's URL, its jobs, faults and stats cleared for this test."""
    anon.post("/_sandbox/reset").raise_for_status()
    return sandbox_url


@pytest.fixture
def http(base: str, module_http: httpx.Client) -> httpx.Client:
    """A client with the sandbox's API key, for /api and /_sandbox alike."""
    return module_http


@pytest.fixture
def sdk(base: str, module_sdk: Chamelaion) -> Chamelaion:
    return module_sdk


def media(video: str = "https://cdn.example.com/42.mp4") -> list[Input]:
    return [
        {"type": "video", "url": video},
        {"type": "audio", "url": "https://cdn.example.com/42.wav"},
    ]


def statuses_until_done(sdk: Chamelaion, request_id: str) -> tuple[list[str], LipsyncRequest]:
    """Poll until a final status; return each distinct status seen, in order, and the last read."""
    seen: list[str] = []
    deadline = time.monotonic() + 10 * (QUEUED + PROCESSING)
    while time.monotonic() < deadline:
        job = sdk.lipsync.requests.retrieve(request_id)
        if not seen or seen[-1] != job.status:
            seen.append(job.status)
        if job.status in ("completed", "failed"):
            return seen, job
        time.sleep(0.05)
    raise AssertionError(f"{request_id} never finished; saw {seen}")


def test_health_and_current_user(anon: httpx.Client, http: httpx.Client) -> None:
    assert anon.get("/api/health").json() == {"status": "ok"}
    assert http.get("/api/v1/users/me").json() == {"name": "Sandbox"}


def test_job_moves_through_queued_and_processing_to_completed(
    sdk: Chamelaion, http: httpx.Client
) -> None:
    created = sdk.lipsync.generate(inputs=media(), reference_id="dub-episode-42")
    assert created.status == "success"

    seen, job = statuses_until_done(sdk, created.request_id)

    assert seen == ["queued", "processing", "completed"]
    assert job.output_url == f"https://storage.chamelaion.example/output/{job.id}.mp4"
    raw = http.get(f"/api/v1/lipsync/requests/{job.id}").json()
    assert set(raw) == {
        "id",
        "created_at",
        "status",
        "started_at",
        "finished_at",
        "output_url",
        "reference_id",
    }
    for name in ("created_at", "started_at", "finished_at"):
        assert ISO_UTC.match(raw[name]), raw[name]


def test_a_queued_job_carries_only_the_fields_it_has(http: httpx.Client) -> None:
    created = http.post("/api/v1/lipsync/generate", json={"inputs": media()}).json()
    raw = http.get(f"/api/v1/lipsync/requests/{created['request_id']}").json()
    assert raw == {"id": created["request_id"], "created_at": raw["created_at"], "status": "queued"}


@pytest.mark.parametrize(
    ("video", "reference_id"),
    [("https://cdn.example.com/fail.mp4", None), ("https://cdn.example.com/ok.mp4", "will-fail")],
)
def test_job_fails_when_its_video_url_or_reference_id_says_fail(
    sdk: Chamelaion, video: str, reference_id: str | None
) -> None:
    if reference_id is None:
        created = sdk.lipsync.generate(inputs=media(video))
    else:
        created = sdk.lipsync.generate(inputs=media(video), reference_id=reference_id)

    seen, job = statuses_until_done(sdk, created.request_id)

    assert seen == ["queued", "processing", "failed"]
    assert job.error_message == "video URL is not accessible"
    assert job.output_url is None
    assert job.finished_at is not None


def test_reference_id_finds_the_newest_request_with_it(sdk: Chamelaion) -> None:
    sdk.lipsync.generate(inputs=media(), reference_id="order-1")
    newest = sdk.lipsync.generate(inputs=media(), reference_id="order-1")
    sdk.lipsync.generate(inputs=media(), reference_id="order-2")

    job = sdk.lipsync.requests.retrieve("order-1")

    assert job.id == newest.request_id
    assert job.reference_id == "order-1"


def test_unknown_request_is_404_with_the_documented_body(
    sdk: Chamelaion, http: httpx.Client
) -> None:
    with pytest.raises(NotFoundError):
        sdk.lipsync.requests.retrieve("no-such-request")
    response = http.get("/api/v1/lipsync/requests/no-such-request")
    assert response.json() == {"error": "lipsync request not found"}


def test_list_pages_newest_first_and_filters_by_reference_id(sdk: Chamelaion) -> None:
    ids = [
        sdk.lipsync.generate(inputs=media(), reference_id=f"batch-{n % 2}").request_id
        for n in range(5)
    ]

    everything = sdk.lipsync.requests.list()
    page = sdk.lipsync.requests.list(limit=2, offset=1)
    batch = sdk.lipsync.requests.list(reference_id="batch-0")

    assert [job.id for job in everything.data] == ids[::-1]
    assert everything.pagination.model_dump() == {"limit": 20, "offset": 0, "total": 5}
    assert [job.id for job in page.data] == [ids[3], ids[2]]
    assert page.pagination.model_dump() == {"limit": 2, "offset": 1, "total": 5}
    assert [job.id for job in batch.data] == [ids[4], ids[2], ids[0]]
    assert batch.pagination.total == 3


@pytest.mark.parametrize(
    "query", ["limit=0", "offset=-1", "limit=ten", "offset=1.5", "limit=", "limit=2&offset=x"]
)
def test_list_rejects_bad_paging(http: httpx.Client, query: str) -> None:
    response = http.get(f"/api/v1/lipsync/requests?{query}")
    assert response.status_code == 400
    assert "must be an integer" in response.json()["error"]


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ({}, "missing authorization header"),
        ({"authorization": "Basic c2FuZGJveA=="}, "invalid authorization format"),
        ({"authorization": "sandbox-key"}, "invalid authorization format"),
        # A client cannot put "Bearer " on the wire (trailing space is illegal), so "Bearer".
        ({"authorization": "Bearer"}, "missing token"),
        ({"authorization": "Bearer wrong"}, "invalid token"),
        ({"x-api-key": "wrong"}, "unauthorized"),
        ({"x-api-key": "wrong", "authorization": f"Bearer {KEY}"}, "unauthorized"),
    ],
)
def test_every_documented_401_body(
    base: str, anon: httpx.Client, headers: dict[str, str], error: str
) -> None:
    for path in ("/v1/lipsync/requests", "/v1/lipsync/requests/x", "/v1/users/me"):
        response = anon.get(f"/api{path}", headers=headers)
        assert response.status_code == 401
        assert response.json() == {"error": error}


def test_bearer_token_is_accepted_and_the_sdk_sees_401(base: str) -> None:
    with Chamelaion(bearer_token=KEY, base_url=f"{base}/api", max_retries=0) as bearer:
        assert bearer.lipsync.requests.list().pagination.total == 0
    with (
        Chamelaion(api_key="nope", base_url=f"{base}/api", max_retries=0) as wrong,
        pytest.raises(AuthenticationError) as caught,
    ):
        wrong.lipsync.requests.list()
    assert caught.value.body == {"error": "unauthorized"}


def test_generate_records_the_exact_body_received(http: httpx.Client) -> None:
    raw = b'{"reference_id": "r-1", "inputs": [%s, %s]}' % (
        json.dumps(media()[1]).encode(),
        json.dumps(media()[0]).encode(),
    )
    created = http.post(
        "/api/v1/lipsync/generate", content=raw, headers={"content-type": "application/json"}
    ).json()
    echoed = http.get(f"/_sandbox/requests/{created['request_id']}/body")
    assert echoed.content == raw
    assert echoed.headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"inputs": media(), "callback_url": "https://x"}, 'unknown field "callback_url"'),
        ({"inputs": media(), "webhook_url": "https://x"}, 'unknown field "webhook_url"'),
        ({"inputs": media()[:1]}, "exactly one video and one audio"),
        ({"inputs": [media()[0], media()[0]]}, "exactly one video and one audio"),
        ({"inputs": [{**media()[0], "start": 0}, media()[1]]}, "exactly type and url"),
        ({"inputs": [{"type": "image", "url": "https://x"}, media()[1]]}, "input type"),
        ({"inputs": [{"type": "video", "url": "ftp://x"}, media()[1]]}, "http(s) URL"),
        ({"inputs": media(), "disable_active_speaker_detection": "yes"}, "must be a boolean"),
        ({"inputs": media(), "reference_id": None}, "reference_id must be"),
        ({"inputs": media(), "reference_id": ""}, "reference_id must be"),
        ({}, "exactly one video and one audio"),
        ([], "JSON object"),
    ],
)
def test_generate_rejects_malformed_and_unknown_fields(
    http: httpx.Client, body: Any, error: str
) -> None:
    response = http.post("/api/v1/lipsync/generate", json=body)
    assert response.status_code == 400
    assert error in response.json()["error"]
    assert http.get("/api/v1/lipsync/requests").json()["pagination"]["total"] == 0


def test_generate_rejects_a_body_that_is_not_json(http: httpx.Client) -> None:
    response = http.post("/api/v1/lipsync/generate", content=b"inputs=1")
    assert response.status_code == 400
    assert response.json() == {"error": "request body must be a JSON object"}


def test_sdk_rejects_with_bad_request_for_an_unknown_field(sdk: Chamelaion) -> None:
    with pytest.raises(BadRequestError) as caught:
        sdk.lipsync.generate(inputs=media(), extra_body={"callback_url": "https://hooks.example"})
    assert caught.value.body == {"error": 'unknown field "callback_url"'}


def test_upload_of_several_megabytes_is_counted_and_hashed(
    sdk: Chamelaion, http: httpx.Client, tmp_path: Path
) -> None:
    rng = random.Random(7)
    video_bytes = rng.randbytes(6 * 1024 * 1024 + 13)
    audio_bytes = rng.randbytes(512 * 1024)
    video_path = tmp_path / "episode.mp4"
    video_path.write_bytes(video_bytes)

    with video_path.open("rb") as video:
        created = sdk.lipsync.generate_with_media(
            video=("episode.mp4", video, "video/mp4"),
            audio=("dub.wav", audio_bytes, "audio/wav"),
            disable_active_speaker_detection=True,
            reference_id="upload-1",
        )

    uploads = http.get(f"/_sandbox/requests/{created.request_id}/uploads").json()
    assert uploads == {
        "video": {
            "bytes": len(video_bytes),
            "sha256": hashlib.sha256(video_bytes).hexdigest(),
            "filename": "episode.mp4",
            "content_type": "video/mp4",
        },
        "audio": {
            "bytes": len(audio_bytes),
            "sha256": hashlib.sha256(audio_bytes).hexdigest(),
            "filename": "dub.wav",
            "content_type": "audio/wav",
        },
        "fields": {"disable_active_speaker_detection": "true", "reference_id": "upload-1"},
    }
    assert sdk.lipsync.requests.retrieve("upload-1").id == created.request_id
    assert http.get(f"/_sandbox/requests/{created.request_id}/body").status_code == 404


def test_upload_with_fail_in_the_filename_fails(sdk: Chamelaion) -> None:
    created = sdk.lipsync.generate_with_media(video=("fail.mp4", b"v", "video/mp4"), audio=b"a")
    assert statuses_until_done(sdk, created.request_id)[1].status == "failed"


def _multipart(boundary: str, parts: list[tuple[str, str | None, bytes]]) -> bytes:
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        body += data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


@pytest.mark.parametrize(
    ("parts", "error"),
    [
        ([("video", "v.mp4", b"v")], "audio file is required"),
        ([("video", "v.mp4", b"v"), ("audio", "a.wav", b"")], "audio file is empty"),
        ([("video", None, b"v"), ("audio", "a.wav", b"a")], "video must be a file"),
        (
            [("video", "v.mp4", b"v"), ("audio", "a.wav", b"a"), ("callback_url", None, b"x")],
            'unknown field "callback_url"',
        ),
        (
            [("video", "v.mp4", b"v"), ("video", "w.mp4", b"w"), ("audio", "a.wav", b"a")],
            'duplicate field "video"',
        ),
        (
            [
                ("video", "v", b"v"),
                ("audio", "a", b"a"),
                ("disable_active_speaker_detection", None, b"yes"),
            ],
            "disable_active_speaker_detection must be a boolean",
        ),
    ],
)
def test_upload_rejects_missing_odd_and_unknown_parts(
    http: httpx.Client, parts: list[tuple[str, str | None, bytes]], error: str
) -> None:
    body = _multipart("b0undary", parts)
    headers = {"content-type": "multipart/form-data; boundary=b0undary"}
    response = http.post("/api/v1/lipsync/generate-with-media", content=body, headers=headers)
    assert response.status_code == 400
    assert response.json() == {"error": error}


def test_upload_rejects_a_body_that_is_not_multipart(http: httpx.Client) -> None:
    response = http.post("/api/v1/lipsync/generate-with-media", json={"video": "x"})
    assert response.status_code == 400
    assert response.json() == {"error": "expected multipart/form-data with a boundary"}


def test_upload_sent_chunked_in_odd_pieces_is_parsed(http: httpx.Client) -> None:
    # Data that almost contains the delimiter, cut into 7-byte chunks, stresses the lookahead.
    video = b"\r\n--b0und" * 50 + b"\r\n--b0undar" + b"end"
    body = _multipart("b0undary", [("video", "v.mp4", video), ("audio", "a.wav", b"\r\n")])

    def chunks() -> Iterator[bytes]:
        for at in range(0, len(body), 7):
            yield body[at : at + 7]

    headers = {"content-type": "multipart/form-data; boundary=b0undary"}
    response = http.post("/api/v1/lipsync/generate-with-media", content=chunks(), headers=headers)
    uploads = http.get(f"/_sandbox/requests/{response.json()['request_id']}/uploads").json()
    assert uploads["video"]["sha256"] == hashlib.sha256(video).hexdigest()
    assert uploads["audio"]["bytes"] == 2
    assert uploads["video"]["content_type"] is None


def test_parser_gives_the_same_parts_whatever_the_chunking() -> None:
    body = b"preamble\r\n" + _multipart(
        "xyz", [("reference_id", None, b"r\r\n-"), ("video", 'a \\"b\\".mp4', b"\r\n--xy\r\n")]
    )

    def parse(step: int) -> list[object]:
        parser = MultipartParser(b"xyz")
        events: list[object] = []
        for at in range(0, len(body), step):
            events += parser.feed(body[at : at + step])
        parser.close()
        merged: list[object] = []
        for event in events:
            if isinstance(event, PartData) and merged and isinstance(merged[-1], PartData):
                merged[-1] = PartData(merged[-1].data + event.data)
            else:
                merged.append(event)
        return merged

    expected = [
        PartStart("reference_id", None, None),
        PartData(b"r\r\n-"),
        PartEnd(),
        PartStart("video", 'a "b".mp4', None),
        PartData(b"\r\n--xy\r\n"),
        PartEnd(),
    ]
    assert parse(len(body)) == expected
    assert parse(1) == expected
    assert parse(5) == expected


def test_parser_refuses_a_truncated_body() -> None:
    parser = MultipartParser(b"xyz")
    parser.feed(b'--xyz\r\nContent-Disposition: form-data; name="video"\r\n\r\nabc')
    with pytest.raises(MultipartError):
        parser.close()


def test_injected_faults_hit_the_next_matching_calls_only(
    sdk: Chamelaion, http: httpx.Client
) -> None:
    job = sdk.lipsync.generate(inputs=media()).request_id
    fault = {"status": 500, "count": 2, "paths": "poll"}
    assert http.post("/_sandbox/faults", json=fault).status_code == 200

    assert sdk.lipsync.generate(inputs=media()).status == "success"  # not a poll
    for _ in range(2):
        with pytest.raises(InternalServerError) as caught:
            sdk.lipsync.requests.retrieve(job)
        assert caught.value.body == {"error": "internal error"}
    assert sdk.lipsync.requests.retrieve(job).id == job


def test_injected_429_carries_retry_after(sdk: Chamelaion, http: httpx.Client) -> None:
    http.post("/_sandbox/faults", json={"status": 429, "retry_after": 3, "paths": "generate"})

    with pytest.raises(RateLimitError) as caught:
        sdk.lipsync.generate(inputs=media())

    assert caught.value.response.headers["retry-after"] == "3"
    assert caught.value.body == {"error": "rate limit exceeded"}
    assert sdk.lipsync.requests.list().pagination.total == 0


def test_fault_after_handling_loses_the_answer_but_keeps_the_job(
    sdk: Chamelaion, http: httpx.Client
) -> None:
    http.post("/_sandbox/faults", json={"status": 503, "paths": "generate", "when": "after"})

    response = http.post("/api/v1/lipsync/generate", json={"inputs": media()})

    assert response.status_code == 503
    assert response.json() == {"error": "service unavailable"}
    assert sdk.lipsync.requests.list().pagination.total == 1


def test_a_delay_fault_makes_the_upstream_slow(http: httpx.Client) -> None:
    http.post("/_sandbox/faults", json={"status": None, "delay": 0.5, "paths": "GET /health"})
    with pytest.raises(httpx.ReadTimeout):
        http.get("/api/health", timeout=0.1)
    assert http.get("/api/health").json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ({"status": 200}, "status must be an HTTP error status (400-599) or null"),
        ({"status": 500, "count": 0}, "count must be an integer >= 1"),
        ({"status": 500, "paths": "x"}, "paths must be one of"),
        ({"code": 500}, "unknown fields: code"),
        ({"status": 500, "rate": 0}, "rate must be a number above 0 and at most 1"),
        ({"status": 500, "rate": 1.5}, "rate must be a number above 0 and at most 1"),
        ({"status": 500, "rate": "0.1"}, "rate must be a number above 0 and at most 1"),
        ({"status": 500, "rate": True}, "rate must be a number above 0 and at most 1"),
        ({"status": 500, "rate": 0.1, "count": 0}, "count must be an integer >= 1"),
        ({"rate": 0.1}, "a fault needs a status, a delay, a malformed answer or a change"),
        ({"malformed": "xml"}, "malformed must be one of"),
        ({"malformed": "html", "status": 500}, "a malformed answer is a 200"),
        ({"grow": -1}, "grow must be an integer from 0"),
        ({"vanish": 1.5}, "vanish must be an integer from 0"),
    ],
)
def test_bad_fault_requests_are_refused(
    http: httpx.Client, fault: dict[str, Any], message: str
) -> None:
    response = http.post("/_sandbox/faults", json=fault)
    assert response.status_code == 400
    assert response.json()["error"].startswith(message)


@pytest.fixture
def seeded() -> Iterator[httpx.Client]:
    """A sandbox of its own whose random faults are drawn from a fixed seed."""
    config = SandboxConfig(queued_seconds=QUEUED, processing_seconds=PROCESSING, seed=11)
    with (
        serve(create_sandbox_app(config)) as url,
        httpx.Client(base_url=url, headers={"x-api-key": KEY}) as client,
    ):
        yield client


def test_rate_faults_hit_their_share_of_matching_calls_until_cleared(
    seeded: httpx.Client,
) -> None:
    for fault in (
        {"status": 500, "rate": 0.1, "paths": "poll"},
        {"status": 429, "rate": 0.05, "retry_after": 1, "paths": "poll"},
    ):
        assert seeded.post("/_sandbox/faults", json=fault).status_code == 200

    answers = [seeded.get("/api/v1/lipsync/requests?limit=1") for _ in range(1000)]
    generates = [
        seeded.post("/api/v1/lipsync/generate", json={"inputs": media()}) for _ in range(50)
    ]

    statuses = [answer.status_code for answer in answers]
    # Both faults stay set and take disjoint shares of one draw: ~100 and ~50 of 1000 calls.
    assert 60 <= statuses.count(500) <= 140
    assert 25 <= statuses.count(429) <= 75
    assert statuses.count(200) == 1000 - statuses.count(500) - statuses.count(429)
    assert all(a.headers["retry-after"] == "1" for a in answers if a.status_code == 429)
    assert [g.status_code for g in generates] == [200] * 50  # not a poll
    stats = seeded.get("/_sandbox/stats").json()
    assert stats["faults_fired"] == {
        "GET /v1/lipsync/requests": {"500": statuses.count(500), "429": statuses.count(429)}
    }

    assert seeded.delete("/_sandbox/faults").status_code == 200
    assert {seeded.get("/api/v1/lipsync/requests").status_code for _ in range(50)} == {200}


def test_the_same_seed_draws_the_same_faults() -> None:
    def run() -> list[int]:
        with (
            serve(create_sandbox_app(SandboxConfig(seed=5))) as url,
            httpx.Client(base_url=url, headers={"x-api-key": KEY}) as client,
        ):
            client.post("/_sandbox/faults", json={"status": 503, "rate": 0.3})
            return [client.get("/api/v1/users/me").status_code for _ in range(40)]

    first = run()
    assert 503 in first and 200 in first
    assert run() == first


def test_a_rate_fault_with_a_count_stops_after_that_many_hits(http: httpx.Client) -> None:
    fault = {"status": 502, "rate": 1, "count": 3, "paths": "GET /v1/users/me"}
    assert http.post("/_sandbox/faults", json=fault).json()["pending_faults"] == 1

    statuses = [http.get("/api/v1/users/me").status_code for _ in range(6)]

    assert statuses == [502, 502, 502, 200, 200, 200]
    assert http.post("/_sandbox/faults", json={"status": 500, "rate": 0.5}).json() == {
        "status": "ok",
        "pending_faults": 1,  # the spent one is gone
    }


def test_created_then_500_keeps_each_job_and_stats_count_them_per_reference_id(
    sdk: Chamelaion, http: httpx.Client
) -> None:
    fault = {"status": 500, "rate": 1, "count": 2, "paths": "generate", "when": "after"}
    http.post("/_sandbox/faults", json=fault)
    http.post("/_sandbox/requests", json={"count": 4})  # test scaffolding: not counted

    lost = [
        http.post("/api/v1/lipsync/generate", json={"inputs": media(), "reference_id": "ep-1"})
        for _ in range(2)
    ]
    kept = sdk.lipsync.generate(inputs=media(), reference_id="ep-1").request_id
    sdk.lipsync.generate(inputs=media(), reference_id="ep-2")
    sdk.lipsync.generate(inputs=media())

    assert [answer.status_code for answer in lost] == [500, 500]
    assert [answer.json() for answer in lost] == [{"error": "internal error"}] * 2
    stats = http.get("/_sandbox/stats").json()
    assert stats["created"] == 5
    by_reference = stats["created_by_reference"]
    assert sorted(by_reference) == ["ep-1", "ep-2"]
    assert len(by_reference["ep-1"]) == 3 and by_reference["ep-1"][-1] == kept
    listed = sdk.lipsync.requests.list(reference_id="ep-1", limit=10).data
    assert sorted(row.id for row in listed) == sorted(by_reference["ep-1"])
    assert stats["faults_fired"] == {"POST /v1/lipsync/generate": {"500": 2}}


def test_forgotten_request_is_gone(sdk: Chamelaion, http: httpx.Client) -> None:
    job = sdk.lipsync.generate(inputs=media(), reference_id="lost").request_id

    assert http.post(f"/_sandbox/requests/{job}/forget").status_code == 200

    for key in (job, "lost"):
        with pytest.raises(NotFoundError):
            sdk.lipsync.requests.retrieve(key)
    assert sdk.lipsync.requests.list().pagination.total == 0


def test_status_can_be_pinned_to_odd_data(sdk: Chamelaion, http: httpx.Client) -> None:
    job = sdk.lipsync.generate(inputs=media(), reference_id="odd").request_id
    pin = {"status": "reviewing", "extra": {"eta": 30}, "drop": ["reference_id"]}

    pinned = http.post(f"/_sandbox/requests/{job}/status", json=pin).json()

    time.sleep(QUEUED + PROCESSING)
    raw = http.get(f"/api/v1/lipsync/requests/{job}").json()
    assert raw == pinned
    assert raw == {"id": job, "created_at": raw["created_at"], "status": "reviewing", "eta": 30}
    assert sdk.lipsync.requests.retrieve(job).status == "reviewing"

    completed = {"status": "completed", "extra": {"output_url": None}, "drop": ["finished_at"]}
    raw = http.post(f"/_sandbox/requests/{job}/status", json=completed).json()
    assert raw["output_url"] is None
    assert "finished_at" not in raw
    assert "started_at" in raw


def test_rate_limit_answers_429_with_an_honest_retry_after() -> None:
    config = SandboxConfig(rate_limit_per_second=2)
    with serve(create_sandbox_app(config)) as base:
        url = f"{base}/api/v1/lipsync/requests"
        with httpx.Client(headers={"x-api-key": KEY}) as http:
            answers = [http.get(url) for _ in range(3)]
            assert [answer.status_code for answer in answers] == [200, 200, 429]
            assert answers[2].json() == {"error": "rate limit exceeded"}
            retry_after = int(answers[2].headers["retry-after"])
            assert retry_after == 1
            assert httpx.get(f"{base}/api/health").status_code == 200  # health is not limited

            time.sleep(retry_after)
            assert http.get(url).status_code == 200


def test_stats_count_and_time_every_call_and_reset_clears_everything(
    sdk: Chamelaion, http: httpx.Client
) -> None:
    before = time.monotonic()
    job = sdk.lipsync.generate(inputs=media()).request_id
    for _ in range(3):
        sdk.lipsync.requests.retrieve(job)
    http.get("/api/v1/lipsync/requests", headers={"x-api-key": "bad"})  # refused calls count too
    http.post("/_sandbox/faults", json={"status": 500, "paths": "generate", "count": 5})

    stats = http.get("/_sandbox/stats").json()

    assert stats["calls"] == {
        "POST /v1/lipsync/generate": 1,
        POLL: 3,
        "GET /v1/lipsync/requests": 1,
    }
    times = stats["timestamps"][POLL]
    assert len(times) == 3
    assert before <= times[0] <= times[1] <= times[2] <= time.monotonic()

    http.post("/_sandbox/reset")

    assert http.get("/_sandbox/stats").json() == {
        "calls": {},
        "timestamps": {},
        "in_flight": {},
        "peak_in_flight": {},
        "created": 0,
        "created_by_reference": {},
        "faults_fired": {},
        "faults_fired_at": {},
    }
    assert sdk.lipsync.generate(inputs=media()).status == "success"  # the fault went too
    with pytest.raises(NotFoundError):
        sdk.lipsync.requests.retrieve(job)


def test_unknown_routes_and_methods_answer_json(http: httpx.Client) -> None:
    assert http.get("/api/v2/nothing").json() == {"error": "not found"}
    response = http.delete("/api/v1/lipsync/requests/x")
    assert response.status_code == 405
    assert response.json() == {"error": "method not allowed"}


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="api_keys"):
        SandboxConfig(api_keys=())
    with pytest.raises(ValueError, match="rate_limit"):
        SandboxConfig(rate_limit_per_second=0)


@pytest.mark.parametrize("order", ["newest_first", "oldest_first"])
def test_list_knobs_order_page_cap_history_and_bulk_jobs(order: str) -> None:
    config = SandboxConfig(list_order=order, list_max_limit=7, history=50)  # type: ignore[arg-type]
    with (
        serve(create_sandbox_app(config)) as url,
        Chamelaion(api_key="sandbox-key", base_url=url + "/api", max_retries=0) as sdk,
    ):
        created = httpx.post(
            url + "/_sandbox/requests", json={"count": 3, "processing_seconds": [2, 6]}
        ).json()
        assert len(created["ids"]) == len(created["finishes"]) == 3
        page = sdk.lipsync.requests.list(limit=1000)
        assert page.pagination.limit == 7 and len(page.data) == 7
        assert page.pagination.total == 53
        history = [row for row in page.data if row.reference_id]
        assert all(row.status in ("completed", "failed") for row in history)
        times = [row.created_at for row in sdk.lipsync.requests.list(limit=7, offset=46).data]
        newest = {row.id for row in page.data} if order == "newest_first" else set(created["ids"])
        assert set(created["ids"]) <= newest
        assert times == sorted(times, reverse=order == "newest_first")
        fresh = sdk.lipsync.requests.retrieve(created["ids"][0])
        assert fresh.status in ("queued", "processing")
        # Made over the last hour, oldest first: as many submissions would have been.
        body = {"count": 3, "spread_over": 3600, "queued_seconds": 7200}
        spread = httpx.post(url + "/_sandbox/requests", json=body).json()
        made = [sdk.lipsync.requests.retrieve(rid).created_at for rid in spread["ids"]]
        assert made == sorted(made) and (made[2] - made[0]).total_seconds() >= 2399
        assert spread["finishes"][0] < spread["finishes"][2] - 2399


def test_times_in_microseconds_and_a_network_latency_per_call() -> None:
    config = SandboxConfig(time_precision="microseconds", latency=0.3)
    with (
        serve(create_sandbox_app(config)) as url,
        httpx.Client(base_url=url, headers={"x-api-key": KEY}) as client,
    ):
        started = time.monotonic()
        created = client.post("/api/v1/lipsync/generate", json={"inputs": media()}).json()
        assert time.monotonic() - started >= 0.3
        row = client.get(f"/api/v1/lipsync/requests/{created['request_id']}").json()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", row["created_at"])
        with pytest.raises(httpx.ReadTimeout):
            client.get("/api/health", timeout=0.1)  # the latency is every call's, health's too
    with pytest.raises(ValueError, match="latency"):
        SandboxConfig(latency=-1)


def malformed_answers(kind: str, path: str) -> httpx.Response:
    """One answer of `kind` from a fresh sandbox holding 3 requests, for GET `path`."""
    with (
        serve(create_sandbox_app(SandboxConfig())) as url,
        httpx.Client(base_url=url, headers={"x-api-key": KEY}) as client,
    ):
        ids = client.post("/_sandbox/requests", json={"count": 3}).json()["ids"]
        fault = {"malformed": kind, "paths": "poll"}
        assert client.post("/_sandbox/faults", json=fault).status_code == 200
        answer = client.get(path.format(id=ids[0]))
        assert client.get(path.format(id=ids[0])).json(), "only the next call is spoilt"
        stats = client.get("/_sandbox/stats").json()
        assert list(stats["faults_fired"].values()) == [{kind: 1}]
        [[(at, what)]] = stats["faults_fired_at"].values()
        assert what == kind and at <= time.monotonic()
        return answer


@pytest.mark.parametrize("path", ["/api/v1/lipsync/requests", "/api/v1/lipsync/requests/{id}"])
def test_malformed_answers_of_each_kind_are_200s(path: str) -> None:
    html = malformed_answers("html", path)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    cut = malformed_answers("truncated", path)
    assert cut.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut.content)
    wrong = malformed_answers("wrong_types", path).json()
    rows = wrong.get("data", [wrong])
    assert rows and all(isinstance(row["id"], str) for row in rows)
    assert all(isinstance(row["status"], int) for row in rows)
    assert all(isinstance(row["created_at"], int) for row in rows)
    nameless = malformed_answers("no_ids", path).json()
    assert all("id" not in row for row in nameless.get("data", [nameless]))
    padded = malformed_answers("padding", path)
    assert len(padded.content) > 8 * 1024 * 1024 and padded.json()["padding"]
    if "{id}" not in path:
        assert malformed_answers("negative_total", path).json()["pagination"]["total"] == -1


@pytest.mark.parametrize("order", ["newest_first", "oldest_first"])
def test_list_pages_can_grow_and_lose_rows_at_the_front_between_reads(order: str) -> None:
    config = SandboxConfig(list_order=order, history=10)  # type: ignore[arg-type]
    with (
        serve(create_sandbox_app(config)) as url,
        httpx.Client(base_url=url, headers={"x-api-key": KEY}) as client,
    ):
        made = client.post("/api/v1/lipsync/generate", json={"inputs": media()}).json()
        before = [row["id"] for row in client.get("/api/v1/lipsync/requests").json()["data"]]
        client.post("/_sandbox/faults", json={"grow": 3, "paths": "poll"})
        grown = [row["id"] for row in client.get("/api/v1/lipsync/requests").json()["data"]]
        assert len(grown) == 14
        new = set(grown) - set(before)
        assert len(new) == 3
        # Newest first, new requests come first; oldest first, they come last.
        assert set(grown[:3] if order == "newest_first" else grown[-3:]) == new
        client.post("/_sandbox/faults", json={"vanish": 2, "paths": "poll"})
        shrunk = [row["id"] for row in client.get("/api/v1/lipsync/requests").json()["data"]]
        # The first two rows no generate call made are gone; the one it made stays.
        gone = [rid for rid in grown if rid != made["request_id"]][:2]
        assert shrunk == [rid for rid in grown if rid not in gone]


def test_requests_finish_on_cue_and_say_when() -> None:
    with (
        serve(create_sandbox_app(SandboxConfig(queued_seconds=600))) as url,
        httpx.Client(base_url=url, headers={"x-api-key": KEY}) as client,
    ):
        ids = [
            client.post("/api/v1/lipsync/generate", json={"inputs": media(video=v)}).json()[
                "request_id"
            ]
            for v in ("https://cdn.example.com/1.mp4", "https://cdn.example.com/fail.mp4")
        ]
        client.post("/_sandbox/requests", json={"count": 2})  # not made by generate: untouched
        assert client.get(f"/api/v1/lipsync/requests/{ids[0]}").json()["status"] == "queued"
        finishes = client.get("/_sandbox/finishes").json()
        assert set(finishes) == set(ids) and min(finishes.values()) > time.monotonic() + 500
        at = client.post("/_sandbox/finish", json={}).json()["at"]
        rows = [client.get(f"/api/v1/lipsync/requests/{rid}").json() for rid in ids]
        assert [row["status"] for row in rows] == ["completed", "failed"]
        assert client.get("/_sandbox/finishes").json() == pytest.approx(dict.fromkeys(ids, at))
        listed = client.get("/api/v1/lipsync/requests").json()["data"]
        statuses = sorted(row["status"] for row in listed)
        assert statuses == ["completed", "failed", "queued", "queued"]
        bad = client.post("/_sandbox/finish", json={"ids": "all"})
        assert bad.status_code == 400
