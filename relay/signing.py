"""Standard Webhooks signatures: `v1` (HMAC-SHA256) per `whsec_` secret, `v1a` (ed25519) per
`whsk_` key.

Several secrets make rotation possible: add the new one, let receivers switch, drop the old;
during the overlap every callback carries a signature from each. HMAC signing is delegated to
the `standardwebhooks` package, the same code receivers verify with; ed25519 uses
`cryptography`. Both sign `{webhook-id}.{timestamp}.{body}`, as the spec defines.

`whsk_` keys are base64 of a 32-byte ed25519 seed, or of 64 bytes (seed then public key, the
libsodium layout Svix uses); receivers verify `v1a` with the `whpk_` public key (base64 of the
raw 32-byte key) that the relay publishes at `GET /api/relay/v1/webhook-keys`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import SecretStr
from standardwebhooks.webhooks import Webhook

HMAC_PREFIX = "whsec_"
ED25519_KEY_PREFIX = "whsk_"
PUBLIC_KEY_PREFIX = "whpk_"
MIN_HMAC_BYTES = 24


def _b64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def check_secret(raw: str) -> str | None:
    """What is wrong with one configured secret (never quoting it), or None when it is usable."""
    if raw.startswith(HMAC_PREFIX):
        try:
            decoded = _b64(raw.removeprefix(HMAC_PREFIX))
        except binascii.Error:
            return "is not base64 after whsec_"
        if len(decoded) < MIN_HMAC_BYTES:
            return f"must hold at least {MIN_HMAC_BYTES} random bytes"
        return None
    if raw.startswith(ED25519_KEY_PREFIX):
        try:
            _private_key(raw)
        except ValueError as exc:
            return str(exc)
        return None
    return "must start with whsec_ (HMAC) or whsk_ (ed25519)"


def _private_key(raw: str) -> Ed25519PrivateKey:
    try:
        decoded = _b64(raw.removeprefix(ED25519_KEY_PREFIX))
    except binascii.Error:
        raise ValueError("is not base64 after whsk_") from None
    if len(decoded) not in (32, 64):
        raise ValueError("must be a 32-byte ed25519 seed or 64 bytes (seed + public key)")
    key = Ed25519PrivateKey.from_private_bytes(decoded[:32])
    if len(decoded) == 64 and decoded[32:] != _raw_public(key):
        raise ValueError("holds a public key that does not belong to its seed")
    return key


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass(frozen=True)
class PublicKey:
    """One published verification key: its id and its `whpk_` value."""

    key_id: str
    value: str


class Signer:
    def __init__(
        self, secrets: tuple[SecretStr, ...], clock: Callable[[], float] = time.time
    ) -> None:
        # `clock`: seconds since the epoch for webhook-timestamp. Workers pass Redis's
        # (relay.redis.clock): receivers refuse a timestamp more than 5 minutes off their own clock,
        # so whether a callback is taken must not depend on which worker's clock signed it.
        self._clock = clock
        if not secrets:
            raise ValueError("at least one webhook secret is needed to sign callbacks")
        self._webhooks: list[Webhook] = []
        self._keys: list[Ed25519PrivateKey] = []
        for secret in secrets:
            raw = secret.get_secret_value()
            if raw.startswith(ED25519_KEY_PREFIX):
                self._keys.append(_private_key(raw))
            else:
                self._webhooks.append(Webhook(raw))

    def public_keys(self) -> list[PublicKey]:
        keys = []
        for key in self._keys:
            raw = _raw_public(key)
            # Derived from the key itself, so every process names the same key the same way.
            key_id = "key_" + hashlib.sha256(raw).hexdigest()[:16]
            keys.append(PublicKey(key_id, PUBLIC_KEY_PREFIX + base64.b64encode(raw).decode()))
        return keys

    def headers(self, webhook_id: str, body: bytes, now: datetime | None = None) -> dict[str, str]:
        """The three Standard Webhooks headers for one delivery attempt of `body`."""
        timestamp = (now or datetime.fromtimestamp(self._clock(), UTC)).replace(microsecond=0)
        text = body.decode()
        signatures = [hook.sign(webhook_id, timestamp, text) for hook in self._webhooks]
        seconds = str(int(timestamp.timestamp()))
        signed = f"{webhook_id}.{seconds}.".encode() + body
        signatures += ["v1a," + base64.b64encode(key.sign(signed)).decode() for key in self._keys]
        return {
            "webhook-id": webhook_id,
            "webhook-timestamp": seconds,
            "webhook-signature": " ".join(signatures),
        }
