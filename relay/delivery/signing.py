"""Standard Webhooks signatures: one `v1,<base64 HMAC-SHA256>` per configured secret.

Several secrets make rotation possible: add the new one, let receivers switch, drop the old.
Signing is delegated to the `standardwebhooks` package, the same code receivers verify with.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import SecretStr
from standardwebhooks.webhooks import Webhook


class Signer:
    def __init__(self, secrets: tuple[SecretStr, ...]) -> None:
        if not secrets:
            raise ValueError("at least one webhook secret is needed to sign callbacks")
        self._webhooks = [Webhook(secret.get_secret_value()) for secret in secrets]

    def headers(self, webhook_id: str, body: bytes, now: datetime | None = None) -> dict[str, str]:
        """The three Standard Webhooks headers for one delivery attempt of `body`."""
        timestamp = (now or datetime.now(UTC)).replace(microsecond=0)
        text = body.decode()
        signatures = " ".join(hook.sign(webhook_id, timestamp, text) for hook in self._webhooks)
        return {
            "webhook-id": webhook_id,
            "webhook-timestamp": str(int(timestamp.timestamp())),
            "webhook-signature": signatures,
        }
