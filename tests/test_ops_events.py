"""Operational events (RELAY_OPS_WEBHOOK_URL): a delivery that gives up and a destination that
is backed off are told to the operator's receiver, signed (verified with `standardwebhooks`)
and retried until taken, with the job id and the last attempt."""

from __future__ import annotations

from collections import Counter

import pytest
from standardwebhooks import Webhook

from relay.devtools.ports import free_port
from relay.errors import ConfigError
from relay.settings import load_settings
from tests.helpers import AUDIO, VIDEO
from tests.servers import serve
from tests.stack import Callback, Receiver, eventually, new_secret, relay_stack


def events(ops: Receiver, hook: Webhook) -> list[tuple[Callback, dict[str, object]]]:
    with ops.lock:
        got = list(ops.received)
    return [(callback, hook.verify(callback.body, callback.headers)) for callback in got]


def of_type(got: list[tuple[Callback, dict[str, object]]], type_: str) -> list[dict[str, object]]:
    """The events of `type_`, each once (a retried one comes again with its webhook-id)."""
    unique = {callback.headers["webhook-id"]: payload for callback, payload in got}
    return [payload for payload in unique.values() if payload["type"] == type_]


def test_a_delivery_that_gives_up_and_a_backed_off_destination_are_told_signed(
    redis_url: str,
) -> None:
    secret = new_secret()
    hook = Webhook(secret)
    ops = Receiver(script=[503])  # the first event is refused once: it comes again
    # Nothing listens there: every attempt is refused, which backs its destination off (a
    # receiver's own 5xx does not: relay.delivery.destinations).
    dead_port = free_port()
    with serve(ops.app()) as ops_url:
        env = {
            "RELAY_OPS_WEBHOOK_URL": ops_url + "/hook",
            "RELAY_OPS_WEBHOOK_SECRET": secret,
            # Backed off after two failures in a row, for at most a second at a time.
            "RELAY_DESTINATION_FAILURES": "2",
            "RELAY_DESTINATION_MAX_BACKOFF": "1",
        }
        with relay_stack(redis_url, env=env, processes=True) as stack:
            job = stack.sdk().lipsync.generate(
                inputs=[{"type": "video", "url": VIDEO}, {"type": "audio", "url": AUDIO}],
                extra_body={"callback_url": f"http://127.0.0.1:{dead_port}/hook?token=s3cret"},
            )
            got = eventually(
                lambda: (
                    (found := events(ops, hook))
                    and of_type(found, "relay.delivery.exhausted")
                    and of_type(found, "relay.destination.backed_off")
                    and found
                ),
                timeout=60,
            )

    (exhausted,) = of_type(got, "relay.delivery.exhausted")
    data = exhausted["data"]
    assert isinstance(data, dict)
    assert data["job_id"] == job.request_id
    assert data["delivery_id"] == job.request_id
    assert data["event_type"] == "lipsync.completed"
    assert data["attempts"] == 4  # the whole RELAY_DELIVERY_RETRY_SCHEDULE (four steps)
    assert data["destination"] == f"http://127.0.0.1:{dead_port}"  # never the URL's path
    last = data["last_attempt"]
    assert isinstance(last, dict)
    assert last["attempt"] == 3
    assert last["status_code"] is None
    assert last["error"] == "refused"
    assert str(last["timestamp"]).endswith("Z")

    first = of_type(got, "relay.destination.backed_off")[0]["data"]
    assert isinstance(first, dict)
    assert first["destination"] == f"http://127.0.0.1:{dead_port}"
    assert first["job_id"] == job.request_id
    assert 0 < float(str(first["backed_off_for"])) <= 1
    assert isinstance(first["last_attempt"], dict)
    assert first["last_attempt"]["error"] == "refused"

    # The refused event came again, with the same webhook-id (so a receiver deduplicates it),
    # freshly signed; every other one came once.
    ids = Counter(callback.headers["webhook-id"] for callback, _ in got)
    assert got[0][0].headers["webhook-id"] == got[1][0].headers["webhook-id"]
    assert sorted(ids.values())[-1] == 2 and list(ids.values()).count(2) == 1
    # Nothing of the callback's URL beyond its destination, its secrets or its body.
    for callback, _ in got:
        assert b"s3cret" not in callback.body and b"whsec_" not in callback.body
        assert b"output_url" not in callback.body


def test_an_ops_url_needs_its_own_secret() -> None:
    settings = load_settings(
        CHAMELAION_API_KEY="k",
        RELAY_WEBHOOK_SECRETS=new_secret(),
        RELAY_OPS_WEBHOOK_URL="https://ops.example.com/relay",
    )
    with pytest.raises(ConfigError, match="RELAY_OPS_WEBHOOK_SECRET"):
        settings.require("worker")


@pytest.mark.parametrize(
    ("variable", "value"),
    [("RELAY_OPS_WEBHOOK_URL", "ftp://ops.example.com"), ("RELAY_OPS_WEBHOOK_SECRET", "plain")],
)
def test_a_bad_ops_setting_is_refused_by_name(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        load_settings(**{variable: value})
