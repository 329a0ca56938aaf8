"""Event types, the per-job filter, metadata, and the order a job's events arrive in."""

from __future__ import annotations

import httpx
import pytest

from relay.sandbox import SandboxConfig
from tests.helpers import AUDIO, SLOW, VIDEO, get, pin, submit, verified
from tests.stack import RELAY_KEY, SANDBOX_KEY, Receiver, Stack, eventually, relay_stack

SLOW_PROCESSING = SandboxConfig(api_keys=(SANDBOX_KEY,), queued_seconds=0.3, processing_seconds=4.0)
METADATA = {"episode": 42, "language": "ja", "route": {"team": "dubbing"}}


def deliveries(stack: Stack, request_id: str) -> list[dict[str, object]]:
    found: list[dict[str, object]] = get(stack, f"/jobs/{request_id}/deliveries").json()[
        "deliveries"
    ]
    return found


def test_processing_then_completed_in_order_with_metadata(redis_url: str) -> None:
    with relay_stack(redis_url, sandbox=SLOW_PROCESSING) as stack:
        request_id = submit(
            stack,
            callback_events=["lipsync.processing", "lipsync.completed"],
            callback_metadata=METADATA,
        )
        first, second = stack.receiver.wait_for(2)
        processing, completed = verified(stack, first), verified(stack, second)
        assert processing["type"] == "lipsync.processing"
        assert completed["type"] == "lipsync.completed"
        assert processing["metadata"] == completed["metadata"] == METADATA
        assert processing["data"]["status"] == "processing"  # type: ignore[index]
        assert first.headers["webhook-id"] != second.headers["webhook-id"]
        # Chamelaion never sees the relay's own fields.
        sent = stack.upstream("GET", f"/_sandbox/requests/{request_id}/body").json()
        assert not {"callback_url", "callback_events", "callback_metadata"} & set(sent)
        states = {d["event"]: d["state"] for d in deliveries(stack, request_id)}
        assert states == {"lipsync.processing": "delivered", "lipsync.completed": "delivered"}


def test_the_default_is_the_final_events_only(redis_url: str) -> None:
    with relay_stack(redis_url, sandbox=SLOW_PROCESSING) as stack:
        request_id = submit(stack)
        [callback] = stack.receiver.wait_for(1)
        assert verified(stack, callback)["type"] == "lipsync.completed"
        assert "metadata" not in verified(stack, callback)
        assert [d["event"] for d in deliveries(stack, request_id)] == ["lipsync.completed"]


def test_a_job_filtered_out_of_its_final_event_sends_nothing(redis_url: str) -> None:
    with relay_stack(redis_url) as stack:
        request_id = submit(stack, callback_events=["lipsync.failed"])
        eventually(
            lambda: (
                httpx.get(
                    f"{stack.api_url}/api/v1/lipsync/requests/{request_id}",
                    headers={"x-api-key": RELAY_KEY},
                ).json()["status"]
                == "completed"
            )
        )
        eventually(lambda: [d["state"] for d in deliveries(stack, request_id)] == ["none"])
        assert stack.receiver.received == []


def test_a_processing_event_still_pending_when_the_job_ends_is_dropped(redis_url: str) -> None:
    # The processing callback fails once and its retry is due in 8 s; the job ends in 4 s.
    receiver = Receiver(script=[500])
    with relay_stack(
        redis_url,
        receiver=receiver,
        sandbox=SLOW_PROCESSING,
        env={"RELAY_DELIVERY_RETRY_SCHEDULE": "0,8,8"},
    ) as stack:
        request_id = submit(stack, callback_events=["lipsync.processing", "lipsync.completed"])
        eventually(
            lambda: (
                {d["event"]: d["state"] for d in deliveries(stack, request_id)}
                == {"lipsync.processing": "stale", "lipsync.completed": "delivered"}
            ),
            timeout=30,
        )
        types = [verified(stack, c)["type"] for c in receiver.received]
        assert types == ["lipsync.processing", "lipsync.completed"]


def test_a_processing_event_in_flight_lands_before_the_final_one(redis_url: str) -> None:
    # Every answer takes 1.5 s; the job ends while the processing callback is on the wire.
    receiver = Receiver(delay=1.5)
    with relay_stack(
        redis_url, receiver=receiver, sandbox=SLOW, env={"RELAY_DELIVERY_TIMEOUT": "5"}
    ) as stack:
        request_id = submit(stack, callback_events=["lipsync.processing", "lipsync.completed"])
        pin(stack, request_id, status="processing")
        receiver.wait_for(1)
        pin(stack, request_id, status="completed")
        first, second = receiver.wait_for(2, timeout=30)
        assert verified(stack, first)["type"] == "lipsync.processing"
        assert verified(stack, second)["type"] == "lipsync.completed"
        assert second.answered_before == 1, "the final event waited for the processing answer"


@pytest.mark.parametrize(
    "extra",
    [
        {"callback_events": []},
        {"callback_events": ["lipsync.started"]},
        {"callback_events": ["lipsync.completed", "lipsync.completed"]},
        {"callback_events": "lipsync.completed"},
        {"callback_metadata": ["not", "an", "object"]},
        {"callback_metadata": {"blob": "x" * 5000}},
    ],
)
def test_bad_events_or_metadata_are_422_and_nothing_is_created(
    redis_url: str, extra: dict[str, object]
) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        body = {
            "inputs": [{"type": "video", "url": VIDEO}, {"type": "audio", "url": AUDIO}],
            "callback_url": stack.callback_url,
            **extra,
        }
        answer = httpx.post(
            stack.api_url + "/api/v1/lipsync/generate", json=body, headers={"x-api-key": RELAY_KEY}
        )
        assert answer.status_code == 422, answer.text
        listed = stack.upstream("GET", "/api/v1/lipsync/requests").json()
        assert listed["pagination"]["total"] == 0
