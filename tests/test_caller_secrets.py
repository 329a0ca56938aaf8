"""Callers as tenants, step three: each caller's callbacks signed with its own secrets, sent only
to its own callback hosts, and every steering action on the job's audit list (#20)."""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from chamelaion import Chamelaion
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from relay.callers.source import CHECK_EVERY
from tests.helpers import AUDIO, SLOW, VIDEO, callers_env, pin
from tests.stack import RELAY_KEY, Stack, eventually, new_secret, relay_stack

B_KEY = "team-b-key-0123456789abcdef"
ADMIN_KEY = "oncall-admin-key-0123456789"
RELAY_API = "/api/relay/v1"
A_SECRET = new_secret()
B_SECRET = new_secret()


def ed25519_key() -> tuple[str, str]:
    """A `whsk_` secret and its `whpk_` public key."""
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return (
        "whsk_" + base64.b64encode(key.private_bytes_raw()).decode(),
        "whpk_" + base64.b64encode(public).decode(),
    )


A_ED25519, A_PUBLIC = ed25519_key()


def callers(**team_a: object) -> list[dict[str, object]]:
    return [
        {"name": "team-a", "keys": [RELAY_KEY], "webhook_secrets": [A_SECRET, A_ED25519], **team_a},
        {"name": "team-b", "keys": [B_KEY], "webhook_secrets": [B_SECRET]},
        {"name": "oncall", "keys": [ADMIN_KEY], "role": "admin"},
    ]


@pytest.fixture
def callers_file(tmp_path: Path) -> Path:
    return tmp_path / "callers.json"


@pytest.fixture
def stack(redis_url: str, callers_file: Path) -> Iterator[Stack]:
    with relay_stack(redis_url, env=callers_env(callers_file, *callers())) as stack:
        yield stack


def submit_as(stack: Stack, key: str, callback_url: str | None = None) -> str:
    result = Chamelaion(
        api_key=key, base_url=stack.api_url + "/api", max_retries=0
    ).lipsync.generate(
        inputs=[{"type": "video", "url": VIDEO}, {"type": "audio", "url": AUDIO}],
        extra_body={"callback_url": callback_url or stack.callback_url},
    )
    return result.request_id


def call(stack: Stack, key: str, method: str, path: str, body: object = None) -> httpx.Response:
    return httpx.request(
        method, stack.api_url + path, json=body, headers={"x-api-key": key}, timeout=30
    )


def verifies(secret: str, headers: dict[str, str], body: bytes) -> bool:
    try:
        Webhook(secret).verify(body, headers)
    except WebhookVerificationError:
        return False
    return True


def test_each_callers_callbacks_are_signed_with_its_own_secret(stack: Stack) -> None:
    submit_as(stack, RELAY_KEY)
    [a_callback] = stack.receiver.wait_for(1)
    submit_as(stack, B_KEY)
    b_callback = stack.receiver.wait_for(2)[1]
    submit_as(stack, ADMIN_KEY)  # no secret of its own: the global ones sign
    admin_callback = stack.receiver.wait_for(3)[2]
    a = (a_callback.headers, a_callback.body)
    b = (b_callback.headers, b_callback.body)
    assert verifies(A_SECRET, *a) and not verifies(B_SECRET, *a)
    assert verifies(B_SECRET, *b) and not verifies(A_SECRET, *b)
    for global_secret in stack.webhook_secrets:
        assert not verifies(global_secret, *a) and not verifies(global_secret, *b)
        assert verifies(global_secret, admin_callback.headers, admin_callback.body)
    assert not verifies(A_SECRET, admin_callback.headers, admin_callback.body)
    # team-a's ed25519 key signs beside its HMAC secret, and is published as team-a's.
    assert len(a_callback.headers["webhook-signature"].split(" ")) == 2
    published = httpx.get(stack.api_url + RELAY_API + "/webhook-keys").json()["keys"]
    assert [(key["caller"], key["public_key"]) for key in published] == [("team-a", A_PUBLIC)]


def test_test_events_are_signed_as_the_callers_callbacks(stack: Stack) -> None:
    sent = call(stack, B_KEY, "POST", RELAY_API + "/test-events", {"url": stack.callback_url})
    assert sent.json()["delivered"] is True, sent.text
    [event] = stack.receiver.wait_for(1)
    assert verifies(B_SECRET, event.headers, event.body)
    assert not verifies(A_SECRET, event.headers, event.body)


def test_callback_hosts_are_checked_at_submit(redis_url: str, callers_file: Path) -> None:
    env = callers_env(callers_file, *callers(callback_hosts=["*.dubbing.svc.cluster.local"]))
    with relay_stack(redis_url, workers=0, env=env) as stack:
        routes = [
            ("/api/v1/lipsync/generate", "callback_url", RELAY_KEY),
            (RELAY_API + "/test-events", "url", RELAY_KEY),
        ]
        for path, field, key in routes:
            body: dict[str, object] = {field: stack.callback_url}
            if "generate" in path:
                body["inputs"] = [{"type": "video", "url": VIDEO}, {"type": "audio", "url": AUDIO}]
            refused = call(stack, key, "POST", path, body)
            assert refused.status_code == 422, (path, refused.text)
            assert "not one of this caller's callback_hosts" in refused.json()["error"]
            assert "*.dubbing.svc.cluster.local" in refused.json()["error"]
        # A watch for team-a is checked against team-a's hosts, whoever asks.
        watched = call(
            stack,
            ADMIN_KEY,
            "POST",
            RELAY_API + "/watches",
            {"request_id": "any", "callback_url": stack.callback_url, "caller": "team-a"},
        )
        assert watched.status_code == 422, watched.text
        assert stack.upstream("GET", "/_sandbox/stats").json()["calls"] == {}
        # Another caller's own hosts are not team-a's.
        assert submit_as(stack, B_KEY)


def test_callback_hosts_are_checked_again_at_delivery(redis_url: str, callers_file: Path) -> None:
    env = callers_env(callers_file, *callers(callback_hosts=["127.0.0.1"]))
    with relay_stack(redis_url, sandbox=SLOW, env=env) as stack:
        request_id = submit_as(stack, RELAY_KEY)
        # The team's hosts change while its job runs.
        fresh = callers_file.with_suffix(".new")
        fresh.write_text(json.dumps({"callers": callers(callback_hosts=["*.elsewhere.example"])}))
        os.replace(fresh, callers_file)
        eventually(
            lambda: (
                call(
                    stack,
                    RELAY_KEY,
                    "POST",
                    "/api/v1/lipsync/generate",
                    {
                        "inputs": [
                            {"type": "video", "url": VIDEO},
                            {"type": "audio", "url": AUDIO},
                        ],
                        "callback_url": stack.callback_url,
                    },
                ).status_code
                == 422
            )
        )
        # The API has taken the new file up; a worker process takes it up within CHECK_EVERY of
        # the change too (its last look may have come just before it): the delivery comes after.
        time.sleep(CHECK_EVERY)
        pin(stack, request_id, status="completed")

        def attempts() -> list[dict[str, object]]:
            found = call(stack, RELAY_KEY, "GET", f"{RELAY_API}/jobs/{request_id}/deliveries")
            deliveries = found.json()["deliveries"]
            return deliveries[0]["attempts"] if deliveries else []

        first = eventually(lambda: attempts())[0]
        assert first["error"] == "policy", first
        assert "team-a's callback_hosts" in str(first["detail"])
        assert stack.receiver.received == []


def test_steering_actions_are_on_the_jobs_audit_list(stack: Stack) -> None:
    request_id = submit_as(stack, RELAY_KEY)
    stack.receiver.wait_for(1)
    eventually(
        lambda: (
            call(stack, RELAY_KEY, "GET", f"{RELAY_API}/jobs/{request_id}/deliveries").json()[
                "deliveries"
            ][0]["state"]
            == "delivered"
        )
    )
    assert (
        call(stack, RELAY_KEY, "POST", f"{RELAY_API}/jobs/{request_id}/redeliver").status_code
        == 202
    )
    assert (
        call(stack, ADMIN_KEY, "POST", f"{RELAY_API}/jobs/{request_id}/redeliver").status_code
        == 202
    )
    assert (
        call(
            stack,
            RELAY_KEY,
            "POST",
            RELAY_API + "/watches",
            {"request_id": request_id, "callback_url": stack.callback_url},
        ).status_code
        == 200
    )
    audit = call(stack, RELAY_KEY, "GET", f"{RELAY_API}/jobs/{request_id}/deliveries").json()[
        "audit"
    ]
    assert [(entry["caller"], entry["action"]) for entry in audit] == [
        ("oncall", "redeliver"),
        ("team-a", "redeliver"),
    ]
    assert all(entry["at"].endswith("Z") for entry in audit)
    # A watch is on the list too, with whom it was for.
    direct = stack.upstream(
        "POST",
        "/api/v1/lipsync/generate",
        json={"inputs": [{"type": "video", "url": VIDEO}, {"type": "audio", "url": AUDIO}]},
    ).json()["request_id"]
    watched = call(
        stack,
        ADMIN_KEY,
        "POST",
        RELAY_API + "/watches",
        {"request_id": direct, "callback_url": stack.callback_url, "caller": "team-a"},
    )
    assert watched.status_code == 201, watched.text
    [entry] = call(stack, RELAY_KEY, "GET", f"{RELAY_API}/jobs/{direct}/deliveries").json()["audit"]
    assert (entry["caller"], entry["action"], entry["detail"]) == ("oncall", "watch", "for team-a")
