"""ed25519 (`v1a`) signatures beside HMAC (`v1`), verified with the published public key only."""

from __future__ import annotations

import base64
import hashlib

import httpx
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import SecretStr
from standardwebhooks import Webhook

from relay.errors import ConfigError
from relay.settings import load_settings
from relay.signing import Signer, check_secret
from tests.helpers import submit
from tests.stack import Callback, new_secret, relay_stack


def new_ed25519_key(*, with_public: bool = False) -> tuple[str, bytes]:
    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes_raw()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    raw = seed + public if with_public else seed
    return "whsk_" + base64.b64encode(raw).decode(), public


def verify_v1a(callback: Callback, public_key: str) -> None:
    """An independent verifier: only the `whpk_` value, the headers and the body."""
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key.removeprefix("whpk_")))
    signed = (
        f"{callback.headers['webhook-id']}.{callback.headers['webhook-timestamp']}.".encode()
        + callback.body
    )
    v1a = [
        base64.b64decode(sig.split(",", 1)[1])
        for sig in callback.headers["webhook-signature"].split(" ")
        if sig.startswith("v1a,")
    ]
    for signature in v1a:
        try:
            key.verify(signature, signed)
            return
        except InvalidSignature:
            continue
    raise AssertionError("no v1a signature verifies with this public key")


def test_callbacks_carry_v1_and_v1a_and_keys_are_published_without_an_api_key(
    redis_url: str,
) -> None:
    hmac_secret = new_secret()
    old_key, old_public = new_ed25519_key()
    new_key, new_public = new_ed25519_key(with_public=True)
    secrets = f"{hmac_secret},{old_key},{new_key}"
    with relay_stack(redis_url, env={"RELAY_WEBHOOK_SECRETS": secrets}) as stack:
        published = httpx.get(stack.api_url + "/api/relay/v1/webhook-keys")
        assert published.status_code == 200
        keys = published.json()["keys"]
        assert [k["public_key"] for k in keys] == [
            "whpk_" + base64.b64encode(old_public).decode(),
            "whpk_" + base64.b64encode(new_public).decode(),
        ]
        assert all(k["algorithm"] == "ed25519" and k["created"].endswith("Z") for k in keys)
        assert len({k["key_id"] for k in keys}) == 2
        # Stable: asked again (any API process), the same ids and first-published times.
        assert httpx.get(stack.api_url + "/api/relay/v1/webhook-keys").json()["keys"] == keys

        submit(stack)
        [callback] = stack.receiver.wait_for(1)
        signatures = callback.headers["webhook-signature"].split(" ")
        assert [s.split(",")[0] for s in signatures] == ["v1", "v1a", "v1a"]
        # Rotation: both keys sign during the overlap; each verifies alone.
        for key in keys:
            verify_v1a(callback, key["public_key"])
        Webhook(hmac_secret).verify(callback.body, callback.headers)
        stranger, _ = new_ed25519_key()
        with pytest.raises(AssertionError):
            verify_v1a(callback, Signer((SecretStr(stranger),)).public_keys()[0].value)


def test_a_tampered_body_fails_v1a() -> None:
    key, public = new_ed25519_key()
    headers = Signer((SecretStr(key),)).headers("msg_1", b'{"a":1}')
    good = Callback(headers, b'{"a":1}', 0.0)
    verify_v1a(good, "whpk_" + base64.b64encode(public).decode())
    with pytest.raises(AssertionError):
        verify_v1a(Callback(headers, b'{"a":2}', 0.0), "whpk_" + base64.b64encode(public).decode())


@pytest.mark.parametrize(
    ("secret", "problem"),
    [
        ("whsk_!!!", "is not base64 after whsk_"),
        ("whsk_" + base64.b64encode(b"x" * 16).decode(), "must be a 32-byte ed25519 seed"),
        ("whsk_" + base64.b64encode(b"x" * 64).decode(), "does not belong to its seed"),
        ("whpk_" + base64.b64encode(b"x" * 32).decode(), "must start with whsec_"),
    ],
)
def test_bad_signing_keys_stop_start_up_without_echoing_them(secret: str, problem: str) -> None:
    assert problem in (check_secret(secret) or "")
    with pytest.raises(ConfigError) as caught:
        load_settings(RELAY_WEBHOOK_SECRETS=secret)
    assert problem in str(caught.value)
    assert secret not in str(caught.value)


def test_key_ids_are_derived_from_the_key() -> None:
    key, public = new_ed25519_key()
    [published] = Signer((SecretStr(key),)).public_keys()
    assert published.key_id == "key_" + hashlib.sha256(public).hexdigest()[:16]


def test_no_ed25519_key_publishes_an_empty_list(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0) as stack:
        assert httpx.get(stack.api_url + "/api/relay/v1/webhook-keys").json() == {"keys": []}
