"""Delivery you can see and steer: attempt log, deliveries by state, redeliver, recover."""

from __future__ import annotations

import pytest

from relay.delivery.attempt_log import EXCERPT_CHARS
from tests.helpers import attempts, get, post, submit, verified
from tests.stack import Receiver, eventually, relay_stack


def test_the_attempt_log_keeps_no_answer_by_default(redis_url: str) -> None:
    # Issue #24, finding 2: any key reads any job's attempt log, and a callback_url pointing at
    # an internal service put that service's answer in it.
    receiver = Receiver(answers={200: b'{"db_password": "hunter2"}'})
    with relay_stack(redis_url, receiver=receiver) as stack:
        request_id = submit(stack)
        [entry] = eventually(lambda: attempts(stack, request_id))
        assert entry["status"] == 200
        assert not entry.get("excerpt")
        assert "hunter2" not in get(stack, f"/jobs/{request_id}/deliveries").text


def test_the_attempt_log_tells_each_attempt(redis_url: str) -> None:
    receiver = Receiver(
        script=[500, 503, 204],
        extra_headers={"content-type": "text/plain"},
        answers={500: b"database on fire" + b"." * 600, 503: b"back soon"},
    )
    env = {"RELAY_ATTEMPT_LOG_EXCERPT": "true"}
    with relay_stack(redis_url, receiver=receiver, env=env) as stack:
        request_id = submit(stack)
        receiver.wait_for(3)
        log = eventually(
            lambda: (found := attempts(stack, request_id)) and len(found) == 3 and found
        )
        assert [entry["status"] for entry in log] == [500, 503, 204]
        # The start of each answer, for whoever looks into a failing delivery.
        assert [entry["excerpt"] for entry in log] == [
            ("database on fire" + "." * 600)[:EXCERPT_CHARS],
            "back soon",
            "",
        ]
        assert [entry["state"] for entry in log] == ["failing", "failing", "delivered"]
        assert [entry["attempt"] for entry in log] == [0, 1, 2]
        assert all(entry["event"] == "lipsync.completed" for entry in log)
        assert all(isinstance(entry["duration_ms"], float) for entry in log)
        assert log[0]["next_at"] is not None and log[2]["next_at"] is None
        assert all(str(entry["at"]).endswith("Z") for entry in log)
        body = get(stack, f"/jobs/{request_id}/deliveries").json()
        [delivery] = body["deliveries"]
        assert delivery["state"] == "delivered" and delivery["webhook_id"].startswith("msg_")
        # Filed by state, found by time.
        delivered = get(stack, "/deliveries", state="delivered").json()
        assert [row["request_id"] for row in delivered["data"]] == [request_id]
        assert get(stack, "/deliveries", state="failing").json()["data"] == []


def test_a_refused_connection_is_logged_as_refused(redis_url: str) -> None:
    with relay_stack(redis_url, env={"RELAY_DELIVERY_RETRY_SCHEDULE": "0"}) as stack:
        stack.callback_url = "http://127.0.0.1:9/hook"  # discard port: nothing listens
        request_id = submit(stack)
        log = eventually(lambda: attempts(stack, request_id))
        assert log[0]["error"] == "refused" and log[0]["status"] is None
        assert log[0]["state"] == "failed"


def test_redeliver_sends_the_same_event_again_and_logs_it(redis_url: str) -> None:
    with relay_stack(redis_url) as stack:
        request_id = submit(stack, reference_id="redo-me")
        [first] = stack.receiver.wait_for(1)
        eventually(lambda: attempts(stack, request_id))
        answer = post(stack, "/jobs/redo-me/redeliver")
        assert answer.status_code == 202
        assert answer.json()["request_id"] == request_id
        first_payload, second = verified(stack, first), stack.receiver.wait_for(2)[1]
        assert verified(stack, second) == first_payload
        assert second.headers["webhook-id"] == first.headers["webhook-id"]
        log = eventually(
            lambda: (found := attempts(stack, request_id)) and len(found) == 3 and found
        )
        assert log[1]["note"] == "redelivery requested"
        assert log[2]["state"] == "delivered" and log[2]["attempt"] == answer.json()["attempt"]


def test_recover_requeues_what_failed_since_the_outage(redis_url: str) -> None:
    receiver = Receiver(script=[500, 500])
    with relay_stack(
        redis_url, receiver=receiver, env={"RELAY_DELIVERY_RETRY_SCHEDULE": "0,0.2"}
    ) as stack:
        request_id = submit(stack)
        receiver.wait_for(2)
        eventually(lambda: get(stack, "/deliveries", state="failed").json()["data"])
        # The receiver is back (answers 200 from now on): recover everything failed since then.
        answer = post(stack, "/deliveries/recover", {"since": "2020-01-01T00:00:00Z"})
        assert answer.json() == {**answer.json(), "requeued": 1, "more": False}
        callbacks = receiver.wait_for(3)
        assert len({c.headers["webhook-id"] for c in callbacks}) == 1
        eventually(lambda: get(stack, "/deliveries", state="delivered").json()["data"])
        assert get(stack, "/deliveries", state="failed").json()["data"] == []
        assert request_id in {
            row["request_id"] for row in get(stack, "/deliveries", state="delivered").json()["data"]
        }


def test_deliveries_page_with_a_cursor(redis_url: str) -> None:
    with relay_stack(redis_url) as stack:
        ids = [submit(stack) for _ in range(3)]
        stack.receiver.wait_for(3)
        eventually(lambda: len(get(stack, "/deliveries", state="delivered").json()["data"]) == 3)
        first = get(stack, "/deliveries", state="delivered", limit="2").json()
        assert len(first["data"]) == 2 and first["next_cursor"]
        rest = get(
            stack, "/deliveries", state="delivered", limit="2", cursor=first["next_cursor"]
        ).json()
        assert rest["next_cursor"] is None
        seen = [row["request_id"] for row in first["data"] + rest["data"]]
        assert sorted(seen) == sorted(ids)


def test_redeliver_refuses_what_cannot_be_redelivered(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        request_id = submit(stack)  # no worker: it never ends
        assert post(stack, f"/jobs/{request_id}/redeliver").status_code == 409
        assert post(stack, "/jobs/no-such-job/redeliver").status_code == 404
        assert get(stack, "/jobs/no-such-job/deliveries").status_code == 404


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/deliveries", {"state": "sideways"}),
        ("/deliveries", {"limit": "0"}),
        ("/deliveries", {"limit": "x"}),
        ("/deliveries", {"since": "yesterday"}),
        ("/deliveries", {"since": "-5"}),
        ("/deliveries", {"cursor": "1e300"}),
    ],
)
def test_bad_queries_are_400(redis_url: str, path: str, params: dict[str, str]) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        answer = get(stack, path, **params)
        assert answer.status_code == 400, answer.text
        assert "error" in answer.json()


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"since": "not a time"},
        {"since": -1e16},
        {"since": 0, "limit": 0},
        {"since": 0, "limit": 5000},
        {"since": 0, "states": ["delivered"]},
        {"since": 0, "states": []},
        {"since": 0, "more": True},
    ],
)
def test_bad_recover_bodies_are_422(redis_url: str, body: object) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        answer = post(stack, "/deliveries/recover", body)
        assert answer.status_code == 422, answer.text
