"""A job's events: the sequence numbers its callbacks carry, and its server-sent event stream
(every status change and delivery outcome, keepalives, Last-Event-ID, closed after the last)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import httpx
import orjson

from relay.sandbox import SandboxConfig
from tests.helpers import SLOW, pin, submit, verified
from tests.stack import RELAY_KEY, SANDBOX_KEY, Stack, relay_stack

QUICK = SandboxConfig(api_keys=(SANDBOX_KEY,), queued_seconds=0.5, processing_seconds=1.0)
BOTH = ["lipsync.processing", "lipsync.completed"]


@contextlib.contextmanager
def stream(
    stack: Stack, request_id: str, *, last_event_id: str | None = None
) -> Iterator[httpx.Response]:
    """The job's event stream, open for the block (httpx streaming)."""
    headers = {"x-api-key": RELAY_KEY, "accept": "text/event-stream"}
    if last_event_id is not None:
        headers["last-event-id"] = last_event_id
    url = f"{stack.api_url}/api/relay/v1/jobs/{request_id}/events"
    with httpx.stream("GET", url, headers=headers, timeout=30) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield response


def messages(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The stream's messages as they come: events ({"id", "event", "data"}) and comments."""
    fields: dict[str, Any] = {}
    for line in response.iter_lines():
        if line == "":
            if fields:
                yield fields
            fields = {}
        elif line.startswith(":"):
            yield {"comment": line[1:].strip()}
        else:
            name, _, value = line.partition(": ")
            fields[name] = orjson.loads(value) if name == "data" else value


def events_of(
    source: httpx.Response | Iterator[dict[str, Any]], count: int | None = None
) -> list[dict[str, Any]]:
    """Events (no comments) until the stream ends, or the first `count`."""
    found = []
    for message in messages(source) if isinstance(source, httpx.Response) else source:
        if "comment" in message:
            continue
        assert message["id"] == str(message["data"]["sequence"])
        assert message["event"] == message["data"]["type"]
        found.append(message["data"])
        if count is not None and len(found) == count:
            break
    return found


def test_callbacks_and_the_stream_carry_the_same_sequence_numbers(redis_url: str) -> None:
    with relay_stack(redis_url, sandbox=QUICK) as stack:
        request_id = submit(stack, callback_events=BOTH)
        with stream(stack, request_id) as response:
            events = events_of(response)  # until the server closes it, after the last
        assert [event["sequence"] for event in events] == list(range(1, len(events) + 1))
        assert {event["request_id"] for event in events} == {request_id}
        statuses = [event["status"] for event in events if event["type"] == "status"]
        assert statuses[0] == "submitted" and statuses[-2:] == ["processing", "completed"]
        by_status = {event["status"]: event for event in events if event["type"] == "status"}
        assert by_status["completed"]["data"]["status"] == "completed"
        deliveries = [event for event in events if event["type"] == "delivery"]
        assert {(d["event"], d["outcome"]) for d in deliveries} == {
            ("lipsync.processing", "delivered"),
            ("lipsync.completed", "delivered"),
        }
        last = events[-1]
        assert last.get("last") is True
        assert (last["event"], last["outcome"]) == ("lipsync.completed", "delivered")
        assert not any(event.get("last") for event in events[:-1])
        # Each callback carries the sequence number of the status event it tells of.
        processing, completed = (verified(stack, c) for c in stack.receiver.wait_for(2))
        assert processing["sequence"] == by_status["processing"]["sequence"]
        assert completed["sequence"] == by_status["completed"]["sequence"]
        assert by_status["processing"]["sequence"] < by_status["completed"]["sequence"]


def test_a_stream_resumes_after_its_last_event_id_without_gaps(redis_url: str) -> None:
    env = {"RELAY_EVENTS_KEEPALIVE": "0.3"}
    with relay_stack(redis_url, sandbox=SLOW, env=env) as stack:
        request_id = submit(stack)
        with stream(stack, request_id) as response:
            received = messages(response)
            seen = events_of(received, count=2)  # submitted, queued
            # Nothing happens now: the stream says it is alive with comments.
            comment = next(m for m in received if "comment" in m)
            assert comment == {"comment": "keepalive"}
        assert [event["status"] for event in seen] == ["submitted", "queued"]
        # Disconnected, the job moves on; the client comes back with its Last-Event-ID.
        pin(stack, request_id, status="completed")
        with stream(stack, request_id, last_event_id=str(seen[-1]["sequence"])) as response:
            rest = events_of(response)
        sequences = [event["sequence"] for event in seen + rest]
        assert sequences == list(range(1, len(sequences) + 1)), "no gap, nothing twice"
        assert rest[0]["status"] == "completed"
        assert rest[-1]["last"] is True
        # Asked again after its end, the stream replays what is left and closes at once.
        with stream(stack, request_id, last_event_id="1") as response:
            assert [event["sequence"] for event in events_of(response)] == sequences[1:]


def test_a_stream_refuses_what_it_cannot_serve(redis_url: str) -> None:
    with relay_stack(redis_url, sandbox=SLOW, workers=0) as stack:
        request_id = submit(stack)
        url = f"{stack.api_url}/api/relay/v1/jobs/{{}}/events"
        key = {"x-api-key": RELAY_KEY}
        missing = httpx.get(url.format("no-such-job"), headers=key)
        assert missing.status_code == 404 and "error" in missing.json()
        json_only = httpx.get(url.format(request_id), headers={**key, "accept": "application/json"})
        assert json_only.status_code == 406
        bad_id = httpx.get(url.format(request_id), headers={**key, "last-event-id": "seven"})
        assert bad_id.status_code == 400
        assert "Last-Event-ID" in bad_id.json()["error"]
