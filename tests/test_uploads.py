"""generate-with-media through the relay: uploads reach the sandbox byte for byte, bad ones never
become jobs, and a caller or upstream that goes away or stalls leaves nothing behind."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from standardwebhooks import Webhook

from relay.api.multipart import MediaForm
from relay.errors import ApiError
from relay.redis import keys
from relay.sandbox import SandboxConfig
from tests.helpers import (
    BOUNDARY,
    MULTIPART,
    UPLOAD,
    audio,
    closing,
    form,
    part,
    verified,
    video,
)
from tests.stack import RELAY_KEY, SANDBOX_KEY, Stack, eventually, job_field, relay_stack

UPSTREAM_CALL = "POST /v1/lipsync/generate-with-media"
MiB = 1024 * 1024
# Data that starts like a delimiter but is not one: a parser that splits on a prefix, or loses
# bytes when a match fails across chunks, changes the hash. Each ends in a byte that no
# delimiter has there, so random data after it cannot complete one by chance.
TRAPS = (
    b"\r\n--" + BOUNDARY[:-1].encode() + b"X",
    b"\r\n--" + BOUNDARY[:5].encode() + b"X",
    b"\r\n-X",
    b"\r\n--" + BOUNDARY.encode()[:-1] + b"\r",
)


def raw_part(dispositions: list[str], value: bytes) -> bytes:
    """A part with these Content-Disposition values (and other `Name: value` lines) as given."""
    lines = [
        line if ":" in line.split(";")[0] else f"Content-Disposition: {line}"
        for line in dispositions
    ]
    return (
        (f"--{BOUNDARY}\r\n" + "".join(f"{line}\r\n" for line in lines) + "\r\n").encode()
        + value
        + b"\r\n"
    )


def callback(url: str) -> bytes:
    return part("callback_url", url.encode())


def post(stack: Stack, content: Any, *, content_type: str = MULTIPART) -> httpx.Response:
    headers = {"x-api-key": RELAY_KEY, "content-type": content_type}
    return httpx.post(stack.api_url + UPLOAD, content=content, headers=headers, timeout=60)


def upstream_calls(stack: Stack) -> int:
    calls: dict[str, int] = stack.upstream("GET", "/_sandbox/stats").json()["calls"]
    return calls.get(UPSTREAM_CALL, 0)


def upstream_jobs(stack: Stack) -> int:
    listing = stack.upstream("GET", "/api/v1/lipsync/requests").json()
    total: int = listing["pagination"]["total"]
    return total


def relay_jobs(redis_url: str) -> list[bytes]:
    client = redis.Redis.from_url(redis_url)
    try:
        return list(client.scan_iter(keys.job("*")))
    finally:
        client.close()


def assert_no_job(stack: Stack, redis_url: str) -> None:
    assert upstream_jobs(stack) == 0, "the upstream completed an upload it should not have"
    assert relay_jobs(redis_url) == []


def error_of(response: httpx.Response) -> str:
    assert response.headers["content-type"] == "application/json"
    message: str = response.json()["error"]
    return message


@pytest.fixture
def stack(redis_url: str) -> Iterator[Stack]:
    with relay_stack(redis_url, workers=0) as stack:
        yield stack


def test_the_official_sdk_uploads_real_files_and_gets_a_signed_callback(
    redis_url: str, tmp_path: Path
) -> None:
    video_path, audio_path = tmp_path / "episode 7.mp4", tmp_path / "dub.wav"
    video_path.write_bytes(os.urandom(5 * MiB + 123))
    audio_path.write_bytes(os.urandom(2 * MiB + 7))
    with (
        relay_stack(redis_url) as stack,
        video_path.open("rb") as video_file,
        audio_path.open("rb") as audio_file,
    ):
        result = stack.sdk().lipsync.generate_with_media(
            video=video_file,
            audio=audio_file,
            reference_id="episode-7-ja",
            disable_active_speaker_detection=True,
            extra_body={"callback_url": stack.callback_url},
        )
        assert result.status == "success"
        request_id = result.request_id

        received = stack.upstream("GET", f"/_sandbox/requests/{request_id}/uploads").json()
        for name, path in (("video", video_path), ("audio", audio_path)):
            data = path.read_bytes()
            assert received[name]["bytes"] == len(data)
            assert received[name]["sha256"] == hashlib.sha256(data).hexdigest()
            assert received[name]["filename"] == path.name
        # Exactly the documented fields went upstream: no callback_url.
        assert received["fields"] == {
            "disable_active_speaker_detection": "true",
            "reference_id": "episode-7-ja",
        }
        assert relay_jobs(redis_url) == [keys.job(request_id).encode()]

        [delivered] = stack.receiver.wait_for(1)
        payloads = [
            Webhook(s).verify(delivered.body, delivered.headers) for s in stack.webhook_secrets
        ]
        assert payloads[0] == payloads[1]
        assert payloads[0]["type"] == "lipsync.completed"
        assert payloads[0]["data"]["id"] == request_id
        assert payloads[0]["data"]["reference_id"] == "episode-7-ja"
        # The relay now answers polls for it from its own state.
        polled = stack.sdk().lipsync.requests.retrieve("episode-7-ja")
        assert polled.id == request_id and polled.status == "completed"


def test_a_large_streamed_upload_reaches_the_upstream_byte_for_byte(
    stack: Stack, redis_url: str
) -> None:
    """64 MiB sent chunked (no Content-Length), full of near-delimiters, in odd-sized writes."""
    block = bytearray(os.urandom(MiB))
    for offset, trap in zip(range(1000, MiB, MiB // 8), TRAPS * 2, strict=False):
        block[offset : offset + len(trap)] = trap
    block[-3:] = b"\r\n-"  # a trap split across every block boundary
    video_hash, audio_data = hashlib.sha256(), os.urandom(3 * MiB + 1)
    sizes = {"video": 0}

    def body() -> Iterator[bytes]:
        yield callback(stack.callback_url) + part("reference_id", b"big-one")
        yield f"--{BOUNDARY}\r\n".encode()
        yield b'Content-Disposition: form-data; name="video"; filename="big.mp4"\r\n\r\n'
        for round_ in range(64):
            chunk = bytes(block[round_:]) + bytes(block[:round_])  # each MiB differs
            video_hash.update(chunk)
            sizes["video"] += len(chunk)
            for start in range(0, len(chunk), 100_003):
                yield chunk[start : start + 100_003]
        yield b"\r\n" + part("audio", audio_data, filename="a.wav") + closing()

    response = post(stack, body())
    assert response.status_code == 200, response.text
    request_id = response.json()["request_id"]
    received = stack.upstream("GET", f"/_sandbox/requests/{request_id}/uploads").json()
    assert received["video"]["bytes"] == sizes["video"] == 64 * MiB
    assert received["video"]["sha256"] == video_hash.hexdigest()
    assert received["audio"]["bytes"] == len(audio_data)
    assert received["audio"]["sha256"] == hashlib.sha256(audio_data).hexdigest()
    assert received["fields"] == {"reference_id": "big-one"}
    assert relay_jobs(redis_url) == [keys.job(request_id).encode()]


HOOK = "http://127.0.0.1:9/hook"
BAD_UPLOADS = {
    # name: (content type, body, status, error fragment, Chamelaion contacted at all)
    "not multipart": ("application/json", b'{"inputs": []}', 415, "multipart/form-data", False),
    "no boundary": ("multipart/form-data", form(video(), audio()), 400, "boundary", False),
    "video not a file": (
        MULTIPART,
        form(callback(HOOK), part("video", b"https://cdn.example.com/v.mp4"), audio()),
        422,
        "video: must be a file part",
        False,
    ),
    "callback_url not http(s), first": (
        MULTIPART,
        form(callback("ftp://files.example.com/hook"), video(), audio()),
        422,
        "callback_url: Value error, scheme 'ftp' is not allowed",
        False,
    ),
    "callback_url to a refused network, first": (
        MULTIPART,
        form(callback("http://10.1.2.3/hook"), video(), audio()),
        422,
        "callback_url refused:",
        False,
    ),
    "callback_url to a refused network, after the files": (
        MULTIPART,
        form(video(), audio(), callback("http://169.254.169.254/hook")),
        422,
        "callback_url refused:",
        True,
    ),
    "unknown field": (
        MULTIPART,
        form(callback(HOOK), part("callbak_url", HOOK.encode()), video(), audio()),
        422,
        "callbak_url: is not a field this endpoint takes",
        False,
    ),
    "callback_url not http(s), after the files": (
        MULTIPART,
        form(video(), audio(), callback("javascript:alert(1)")),
        422,
        "callback_url: Value error",
        True,
    ),
    "missing video": (MULTIPART, form(callback(HOOK), audio()), 422, "video: a file part", True),
    "missing audio": (MULTIPART, form(callback(HOOK), video()), 422, "audio: a file part", True),
    "extra file part": (
        MULTIPART,
        form(video(), audio(), part("subtitles", b"1\r\n00:00", filename="ja.srt")),
        422,
        "subtitles: is a file part; only video and audio may be files",
        True,
    ),
    "callback_url sent as a file": (
        MULTIPART,
        form(video(), part("callback_url", HOOK.encode(), filename="hook.txt"), audio()),
        422,
        "callback_url: is a file part",
        True,
    ),
    "duplicate video": (MULTIPART, form(video(), video(), audio()), 422, "more than once", True),
    # Finding 6: a header block over 16 KiB is refused even when it arrives whole.
    "huge part headers": (
        MULTIPART,
        form(raw_part(['form-data; name="reference_id"', "X-Pad: " + "a" * 60_000], b"r")),
        400,
        "headers are too large",
        False,
    ),
    # Finding 7: what a common reader could read as another part than the relay checked.
    "two Content-Disposition headers": (
        MULTIPART,
        form(
            raw_part(
                ['form-data; name="video"; filename="v.mp4"', 'form-data; name="reference_id"'],
                b"r",
            ),
            video(),
            audio(),
        ),
        400,
        "more than one Content-Disposition header",
        False,
    ),
    "a repeated name parameter": (
        MULTIPART,
        form(raw_part(['form-data; name="reference_id"; name="video"'], b"r"), video(), audio()),
        400,
        "ambiguous name parameter",
        False,
    ),
    "an RFC 2231 name": (
        MULTIPART,
        form(raw_part(["form-data; name=\"reference_id\"; name*=UTF-8''video"], b"r")),
        400,
        "ambiguous name* parameter",
        False,
    ),
    "text that is not a parameter": (
        MULTIPART,
        form(raw_part(['form-data; junk; name="reference_id"'], b"r"), video(), audio()),
        400,
        "not a parameter",
        False,
    ),
    "no closing boundary": (
        MULTIPART,
        form(video(), audio())[: -len(closing())],
        400,
        "ended before its closing boundary",
        True,
    ),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_uploads_get_a_clear_4xx_and_never_become_a_job(
    stack: Stack, redis_url: str, case: str
) -> None:
    content_type, body, status, fragment, contacted = BAD_UPLOADS[case]
    response = post(stack, body, content_type=content_type)
    assert response.status_code == status, response.text
    assert fragment in error_of(response)
    if not contacted:
        assert upstream_calls(stack) == 0, "known before any byte went upstream"
    assert_no_job(stack, redis_url)


def test_bad_upload_errors_reach_a_caller_still_sending(stack: Stack, redis_url: str) -> None:
    """The 422 is found after 4 MiB, with 32 MiB still to come: the caller gets it, not a reset."""
    body = form(video(4 * MiB), part("extra", b"x", filename="x.bin"), audio(32 * MiB))
    response = post(stack, (body[i : i + 65536] for i in range(0, len(body), 65536)))
    assert response.status_code == 422
    assert "extra: is a file part" in error_of(response)
    assert_no_job(stack, redis_url)


def test_uploads_over_the_size_limit_get_413(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0, env={"RELAY_MAX_UPLOAD_BYTES": str(MiB)}) as stack:
        body = form(callback(HOOK), video(MiB + 1), audio())
        declared = post(stack, body)
        assert declared.status_code == 413
        assert error_of(declared) == f"request body is larger than {MiB} bytes"
        assert upstream_calls(stack) == 0, "a declared size is refused before any upstream call"

        chunked = post(stack, (body[i : i + 65536] for i in range(0, len(body), 65536)))
        assert chunked.status_code == 413
        assert error_of(chunked) == f"request body is larger than {MiB} bytes"
        assert_no_job(stack, redis_url)

        within = post(stack, form(callback(HOOK), video(MiB // 2), audio()))
        assert within.status_code == 200, within.text


def raw_upload(stack: Stack, body: bytes, sent: int) -> socket.socket:
    """Start an upload over a plain socket that declares all of `body` but sends `sent` bytes."""
    url = urlsplit(stack.api_url)
    assert url.hostname is not None and url.port is not None
    sock = socket.create_connection((url.hostname, url.port))
    head = (
        f"POST {UPLOAD} HTTP/1.1\r\nHost: {url.netloc}\r\nx-api-key: {RELAY_KEY}\r\n"
        f"Content-Type: {MULTIPART}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body[:sent])
    return sock


def read_response(sock: socket.socket) -> bytes:
    """One whole HTTP response (headers, then Content-Length bytes of body)."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(
        next(line for line in head.split(b"\r\n") if line.startswith(b"content-length:"))[15:]
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_a_caller_disconnecting_mid_upload_aborts_the_upstream_request(
    stack: Stack, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.api.uploads")
    body = form(callback(stack.callback_url), video(8 * MiB), audio(MiB))
    sock = raw_upload(stack, body, 4 * MiB)
    eventually(lambda: upstream_calls(stack) == 1)  # the upload is on its way upstream
    sock.close()

    eventually(lambda: "caller disconnected mid-upload" in caplog.text)
    time.sleep(0.3)  # time enough for the sandbox to have finished that request, had it gone on
    assert_no_job(stack, redis_url)
    # The relay is none the worse: the same upload, sent whole, goes through.
    assert post(stack, body).status_code == 200
    assert upstream_jobs(stack) == 1 and len(relay_jobs(redis_url)) == 1


def test_a_stalled_caller_is_cut_off_and_leaves_no_job(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0, env={"RELAY_UPSTREAM_TIMEOUT": "1"}) as stack:
        body = form(callback(HOOK), video(4 * MiB), audio())
        with raw_upload(stack, body, 2 * MiB) as sock:
            sock.settimeout(10)
            started = time.monotonic()
            answer = read_response(sock)
            waited = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert b"upload stalled: nothing arrived for 1 s" in answer
        assert 0.8 <= waited < 6
        assert_no_job(stack, redis_url)


def test_an_upstream_that_stops_reading_is_given_up_on(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0, env={"RELAY_UPSTREAM_TIMEOUT": "1"}) as stack:
        stack.upstream("POST", "/_sandbox/faults", json={"delay": 2.5, "paths": UPSTREAM_CALL})
        body = form(callback(HOOK), video(48 * MiB), audio())
        response = post(stack, (body[i : i + 65536] for i in range(0, len(body), 65536)))
        assert response.status_code == 504
        assert error_of(response) == "Chamelaion stopped accepting the upload for 1 s"
        time.sleep(2)  # the sandbox wakes up to a body that was cut off
        assert_no_job(stack, redis_url)


def test_callback_url_after_the_files_is_kept_by_the_relay_only(
    stack: Stack, redis_url: str
) -> None:
    """curl -F sends parts in argument order, so callback_url may come last."""
    video_data, audio_data = os.urandom(3 * MiB), os.urandom(MiB)
    body = form(
        part("video", video_data, filename="v.mp4"),
        part("audio", audio_data, filename="a.wav"),
        part("reference_id", b"curl-style"),
        callback(stack.callback_url),
    )
    response = post(stack, body)
    assert response.status_code == 200, response.text
    request_id = response.json()["request_id"]
    received = stack.upstream("GET", f"/_sandbox/requests/{request_id}/uploads").json()
    assert received["video"]["sha256"] == hashlib.sha256(video_data).hexdigest()
    assert received["audio"]["sha256"] == hashlib.sha256(audio_data).hexdigest()
    assert received["fields"] == {"reference_id": "curl-style"}
    client = redis.Redis.from_url(redis_url)
    try:
        tracked = client.hget(keys.job(request_id), "callback_url")
    finally:
        client.close()
    assert isinstance(tracked, bytes)
    assert tracked.decode() == stack.callback_url


def test_a_boundary_that_needs_quoting_reaches_the_upstream_quoted(stack: Stack) -> None:
    boundary = "form: part (2)"
    body = form(callback(HOOK), video(), audio()).replace(BOUNDARY.encode(), boundary.encode())
    response = post(stack, body, content_type=f'multipart/form-data; boundary="{boundary}"')
    assert response.status_code == 200, response.text
    received = stack.upstream("GET", f"/_sandbox/requests/{response.json()['request_id']}/uploads")
    assert received.json()["video"]["bytes"] == 64 * 1024


@pytest.mark.parametrize(
    ("fault", "status", "message"),
    [
        ({"status": 413, "error": "video exceeds 4 GiB"}, 413, "video exceeds 4 GiB"),
        ({"status": 429, "retry_after": 7}, 429, "rate limit exceeded (Chamelaion)"),
        # Without a reference_id a 5xx may hide a created job the relay cannot look for: said so.
        ({"status": 500}, 502, "Chamelaion failed: internal error. The job may exist"),
    ],
)
def test_an_upstream_rejection_is_passed_on_and_nothing_is_tracked(
    stack: Stack, redis_url: str, fault: dict[str, Any], status: int, message: str
) -> None:
    stack.upstream("POST", "/_sandbox/faults", json={**fault, "paths": UPSTREAM_CALL})
    response = post(stack, form(callback(HOOK), video(2 * MiB), audio()))
    assert response.status_code == status
    assert error_of(response).startswith(message)
    assert upstream_calls(stack) == 1
    assert relay_jobs(redis_url) == []


def test_the_upstreams_own_validation_errors_are_passed_on(stack: Stack, redis_url: str) -> None:
    response = post(stack, form(callback(HOOK), video(), part("audio", b"", filename="a.wav")))
    assert response.status_code == 400
    assert error_of(response) == "audio file is empty"
    assert relay_jobs(redis_url) == []


# Pure parsing: whatever way the body is cut into chunks, the same bytes go upstream.
HOOK_PART = callback("https://hooks.example.com/chamelaion?x=1")
PARTS = (
    part("reference_id", "épisode-7".encode()),
    part(
        "video", b"".join(TRAPS) * 3 + os.urandom(300), filename="v.mp4", content_type="video/mp4"
    ),
    part("disable_active_speaker_detection", b"false"),
    part("audio", os.urandom(200) + TRAPS[0], filename="a.wav"),
)


def forwarded(body: bytes, cuts: list[int], promise_at: int | None = None) -> bytes:
    """What goes upstream for `body` fed in pieces; with `promise_at`, its size is promised
    from the body's length once the piece ending there has been fed."""
    form_ = MediaForm(BOUNDARY.encode())
    out: list[bytes] = []
    promised: int | None = None
    edges = [0, *sorted({*cuts, *([promise_at] if promise_at else [])}), len(body)]
    for start, end in itertools.pairwise(edges):
        out += form_.feed(body[start:end])
        if end == promise_at:
            promised = form_.promise(len(body))
    sent = b"".join(out) + form_.finish()
    assert promised is None or len(sent) == promised
    return sent


@settings(max_examples=300, deadline=None)
@given(
    st.integers(min_value=0, max_value=len(PARTS)),
    st.lists(st.integers(min_value=1, max_value=4000), max_size=40),
    st.one_of(st.none(), st.integers(min_value=1, max_value=4000)),
)
def test_the_body_goes_on_unchanged_but_for_callback_url_however_it_is_cut(
    callback_at: int, cuts: list[int], promise_at: int | None
) -> None:
    body = form(*PARTS[:callback_at], HOOK_PART, *PARTS[callback_at:])
    sent = forwarded(body, [cut for cut in cuts if cut < len(body)], promise_at)
    expected = form(*PARTS)
    # A promised size leaves room where a later callback_url part was: epilogue filler.
    assert sent[: len(expected)] == expected
    assert sent[len(expected) :] == b"" or (
        promise_at is not None and set(sent[len(expected) :]) <= set(b"\r\n")
    )


def test_a_callback_url_dropped_after_the_promise_is_made_up_for_after_the_end() -> None:
    body = form(*PARTS, HOOK_PART)
    sent = forwarded(body, [], promise_at=len(PARTS[0]))
    assert len(sent) == len(body)
    assert sent == form(*PARTS) + (b"\r\n" * len(HOOK_PART))[: len(HOOK_PART)]


def test_the_form_keeps_callback_url_and_reference_id_for_the_relay() -> None:
    form_ = MediaForm(BOUNDARY.encode())
    form_.feed(form(*PARTS, HOOK_PART))
    form_.finish()
    assert form_.callback_url == "https://hooks.example.com/chamelaion?x=1"
    assert form_.reference_id == "épisode-7"
    assert form_.file_sizes == {
        "video": len(b"".join(TRAPS)) * 3 + 300,
        "audio": 200 + len(TRAPS[0]),
    }


def test_a_field_too_long_is_refused_without_being_held() -> None:
    form_ = MediaForm(BOUNDARY.encode())
    with pytest.raises(ApiError) as caught:
        form_.feed(part("reference_id", b"r" * 20_000))
    assert caught.value.status_code == 422
    assert "reference_id: is longer than" in caught.value.message
    assert orjson.dumps(caught.value.details)


def test_part_headers_over_the_limit_are_refused_whole_or_in_pieces() -> None:
    # Finding 6: the old reader only counted a header block that spanned chunks.
    body = form(raw_part(['form-data; name="reference_id"', "X-Pad: " + "a" * 60_000], b"r"))
    for cuts in ([], [100], [30_000]):
        with pytest.raises(ApiError, match="headers are too large"):
            forwarded(body, cuts)


def test_a_full_width_callback_url_is_stored_normalised_and_delivered(redis_url: str) -> None:
    # Finding 5: the multipart route stored the raw URL, which the delivery client could not
    # even parse; the attempt crashed and was retried by arq, and no callback ever came.
    with relay_stack(
        redis_url, env={"RELAY_CALLBACK_ALLOWED_NETWORKS": "127.0.0.0/8,::1/128"}
    ) as stack:
        port = urlsplit(stack.callback_url).port
        full_width = f"http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54:{port}/hook"
        response = post(stack, form(callback(full_width), video(), audio()))
        assert response.status_code == 200, response.text
        request_id = response.json()["request_id"]
        stored = job_field(redis_url, request_id, "callback_url")
        assert stored == f"http://localhost:{port}/hook".encode()
        [delivered] = stack.receiver.wait_for(1, timeout=30)
        assert orjson.loads(delivered.body)["data"]["id"] == request_id


# --- Events and metadata on uploads (#21 item 5) -------------------------------------------------

EVENTS = ["lipsync.processing", "lipsync.completed"]
# What the official SDK can carry in form fields: text, in nested objects and lists.
FORM_METADATA = {"episode": "42", "route": {"team": "dubbing", "tags": ["ja", "dub"]}}
SLOWER = SandboxConfig(api_keys=(SANDBOX_KEY,), queued_seconds=0.3, processing_seconds=2.0)


def test_uploads_take_callback_events_and_metadata_through_the_sdk(
    redis_url: str, tmp_path: Path
) -> None:
    video_path, audio_path = tmp_path / "v.mp4", tmp_path / "a.wav"
    video_path.write_bytes(os.urandom(MiB))
    audio_path.write_bytes(os.urandom(64 * 1024))
    with (
        relay_stack(redis_url, sandbox=SLOWER) as stack,
        video_path.open("rb") as video_file,
        audio_path.open("rb") as audio_file,
    ):
        result = stack.sdk().lipsync.generate_with_media(
            video=video_file,
            audio=audio_file,
            reference_id="upload-events",
            extra_body={
                "callback_url": stack.callback_url,
                "callback_events": EVENTS,
                "callback_metadata": FORM_METADATA,
            },
        )
        request_id = result.request_id
        received = stack.upstream("GET", f"/_sandbox/requests/{request_id}/uploads").json()
        assert received["fields"] == {"reference_id": "upload-events"}, "relay fields stay here"
        assert received["video"]["sha256"] == hashlib.sha256(video_path.read_bytes()).hexdigest()
        first, second = stack.receiver.wait_for(2, timeout=30)
        processing, completed = verified(stack, first), verified(stack, second)
        assert [processing["type"], completed["type"]] == EVENTS
        assert processing["metadata"] == completed["metadata"] == FORM_METADATA
        assert completed["data"]["id"] == request_id  # type: ignore[index]
        assert first.headers["webhook-id"] != second.headers["webhook-id"]


def test_metadata_as_one_json_part_keeps_its_types(stack: Stack, redis_url: str) -> None:
    metadata: dict[str, object] = {
        "episode": 42,
        "final": True,
        "note": None,
        "scores": [1.5, 2],
        "empty": {},
    }
    response = stack.sdk().lipsync.with_raw_response.generate_with_media(
        video=("v.mp4", os.urandom(1024)),
        audio=("a.wav", os.urandom(1024)),
        extra_body={
            "callback_url": stack.callback_url,
            "callback_events": ["lipsync.failed"],
            "callback_metadata": orjson.dumps(metadata).decode(),
        },
    )
    request_id = response.parse().request_id
    assert orjson.loads(job_field(redis_url, request_id, "metadata") or b"") == metadata
    assert job_field(redis_url, request_id, "events") == b"lipsync.failed"


def nested(depth: int) -> dict[str, object]:
    value: dict[str, object] = {"a": "x"}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


DEEP = nested(300)
# name: (JSON body fields, the same as form parts)
BAD_OPTIONS: dict[str, tuple[dict[str, object], list[bytes]]] = {
    "unknown event": (
        {"callback_events": ["lipsync.started"]},
        [part("callback_events[]", b"lipsync.started")],
    ),
    "an event twice": (
        {"callback_events": ["lipsync.completed", "lipsync.completed"]},
        [part("callback_events[]", b"lipsync.completed")] * 2,
    ),
    "metadata too large": (
        {"callback_metadata": {"blob": "x" * 5000}},
        [part("callback_metadata[blob]", b"x" * 5000)],
    ),
    "metadata too large as JSON": (
        {"callback_metadata": {"blob": "x" * 5000}},
        [part("callback_metadata", orjson.dumps({"blob": "x" * 5000}))],
    ),
    # Deeper than orjson writes (its limit is 255 levels): a 500 on the JSON route before.
    "metadata nested too deeply": (
        {"callback_metadata": DEEP},
        [part("callback_metadata" + "[a]" * 300, b"x")],
    ),
    "metadata nested too deeply as JSON": (
        {"callback_metadata": DEEP},
        [part("callback_metadata", json.dumps(DEEP).encode())],
    ),
    "metadata not an object": (
        {"callback_metadata": ["not", "an", "object"]},
        [part("callback_metadata", b'["not", "an", "object"]')],
    ),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
@pytest.mark.parametrize("where", ["before the files", "after the files"])
def test_bad_events_or_metadata_get_the_json_routes_422(
    stack: Stack, redis_url: str, case: str, where: str
) -> None:
    fields, parts = BAD_OPTIONS[case]
    inputs = [{"type": "video", "url": "https://cdn.example.com/v.mp4"}]
    inputs.append({"type": "audio", "url": "https://cdn.example.com/a.wav"})
    as_json = httpx.post(
        stack.api_url + "/api/v1/lipsync/generate",
        json={"inputs": inputs, "callback_url": HOOK, **fields},
        headers={"x-api-key": RELAY_KEY},
    )
    assert as_json.status_code == 422, as_json.text
    files = [video(), audio()]
    body = (
        form(callback(HOOK), *parts, *files)
        if where == "before the files"
        else form(callback(HOOK), *files, *parts)
    )
    as_form = post(stack, body)
    assert as_form.status_code == 422, as_form.text
    assert as_form.json() == as_json.json()
    if where == "before the files":
        assert upstream_calls(stack) == 0, "refused before Chamelaion is contacted"
    assert_no_job(stack, redis_url)


BAD_FORM_ONLY = {
    "metadata not JSON": (part("callback_metadata", b"{episode"), "callback_metadata: must be"),
    "metadata both ways": (
        part("callback_metadata", b'{"a": "1"}') + part("callback_metadata[b]", b"2"),
        "callback_metadata: is given both",
    ),
    "a list of objects": (part("callback_metadata[items][][a]", b"1"), "callback_metadata[items]"),
    "a value and an object": (
        part("callback_metadata[a]", b"1") + part("callback_metadata[a][b]", b"2"),
        "callback_metadata[a][b]: conflicts",
    ),
    "a metadata key twice": (
        part("callback_metadata[a]", b"1") + part("callback_metadata[a]", b"2"),
        "callback_metadata[a]: appears more than once",
    ),
    "events as a file": (
        part("callback_events[]", b"lipsync.completed", filename="e.txt"),
        "callback_events[]: is a file part",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FORM_ONLY))
def test_form_shapes_that_cannot_be_metadata_get_a_clear_422(
    stack: Stack, redis_url: str, case: str
) -> None:
    bad, fragment = BAD_FORM_ONLY[case]
    response = post(stack, form(callback(HOOK), bad, video(), audio()))
    assert response.status_code == 422, response.text
    assert fragment in error_of(response)
    assert upstream_calls(stack) == 0
    assert_no_job(stack, redis_url)


def test_events_and_metadata_after_the_promise_are_made_up_for() -> None:
    """Relay fields after the files leave the upstream body as a callback_url part does."""
    relay_parts = part("callback_events[]", b"lipsync.completed") + part(
        "callback_metadata[a][]", b"1"
    )
    body = form(*PARTS, HOOK_PART, relay_parts)
    sent = forwarded(body, [], promise_at=len(PARTS[0]))
    assert len(sent) == len(body)
    assert sent.startswith(form(*PARTS))
    form_ = MediaForm(BOUNDARY.encode())
    form_.feed(body)
    form_.finish()
    assert form_.options.callback_events == ["lipsync.completed"]
    assert form_.options.callback_metadata == {"a": ["1"]}
