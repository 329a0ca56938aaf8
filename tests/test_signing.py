"""Signatures as receivers check them: property-based, verified with `standardwebhooks`."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from standardwebhooks import Webhook, WebhookVerificationError

from relay.signing import Signer

secrets_ = st.lists(
    st.binary(min_size=24, max_size=64).map(lambda raw: "whsec_" + base64.b64encode(raw).decode()),
    min_size=1,
    max_size=4,
    unique=True,
)
bodies = st.text(max_size=2000).map(str.encode)
ids = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=64)


@settings(max_examples=200, deadline=None)
@given(keys=secrets_, body=bodies, webhook_id=ids)
def test_every_configured_secret_verifies_and_nothing_else_does(
    keys: list[str], body: bytes, webhook_id: str
) -> None:
    headers = Signer(tuple(SecretStr(k) for k in keys)).headers(webhook_id, body)
    assert headers["webhook-id"] == webhook_id
    assert len(headers["webhook-signature"].split(" ")) == len(keys)
    for key in keys:
        assert Webhook(key).verify(body, headers, json_parse=False) is None
    # Not all zeros: HMAC pads keys with zero bytes, so 24 and 32 zero bytes are one key.
    stranger = "whsec_" + base64.b64encode(b"stranger" * 4).decode()
    if stranger not in keys:
        with pytest.raises(WebhookVerificationError):
            Webhook(stranger).verify(body, headers, json_parse=False)


@settings(max_examples=200, deadline=None)
@given(keys=secrets_, body=bodies, webhook_id=ids, tamper=st.sampled_from(["body", "id", "time"]))
def test_any_change_to_what_was_signed_fails_verification(
    keys: list[str], body: bytes, webhook_id: str, tamper: str
) -> None:
    headers = Signer(tuple(SecretStr(k) for k in keys)).headers(webhook_id, body)
    if tamper == "body":
        body += b" "
    elif tamper == "id":
        headers["webhook-id"] = webhook_id + "x"
    else:
        headers["webhook-timestamp"] = str(int(headers["webhook-timestamp"]) - 1)
    with pytest.raises(WebhookVerificationError):
        Webhook(keys[0]).verify(body, headers, json_parse=False)


def test_old_timestamps_are_replays_to_receivers() -> None:
    key = "whsec_" + base64.b64encode(b"k" * 32).decode()
    signer = Signer((SecretStr(key),))
    stale = signer.headers("msg_1", b"{}", now=datetime.now(UTC) - timedelta(minutes=6))
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(key).verify(b"{}", stale)
