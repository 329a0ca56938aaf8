"""Secrets never leave the process: not in logs, errors or callbacks, over a whole run."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import httpx
import pytest
from standardwebhooks import Webhook

from tests.helpers import AUDIO, VIDEO
from tests.stack import RELAY_KEY, SANDBOX_KEY, Receiver, relay_stack


def test_no_configured_secret_appears_in_logs_errors_or_callbacks(
    redis_url: str, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    receiver = Receiver(script=[500])  # one retry, so failure paths log too
    with relay_stack(redis_url, receiver=receiver, processes=True, log_dir=tmp_path) as stack:
        token_url = stack.callback_url + "?token=receiver-private-token"
        answers = [
            httpx.post(
                stack.api_url + "/api/v1/lipsync/generate",
                json={"inputs": []},
                headers={"x-api-key": "guessed-" + RELAY_KEY},
            ),
            httpx.post(
                stack.api_url + "/api/v1/lipsync/generate",
                json={
                    "inputs": [{"type": "video", "url": VIDEO}, {"type": "audio", "url": AUDIO}],
                    "callback_url": "http://user:receiver-private-pw@10.0.0.1/",
                },
                headers={"x-api-key": RELAY_KEY},
            ),
        ]
        stack.sdk().lipsync.generate(
            inputs=[{"type": "video", "url": VIDEO}, {"type": "audio", "url": AUDIO}],
            extra_body={"callback_url": token_url},
        )
        callbacks = receiver.wait_for(2)
        Webhook(stack.webhook_secrets[0]).verify(callbacks[-1].body, callbacks[-1].headers)
    secrets = [RELAY_KEY, SANDBOX_KEY, "receiver-private-token", "receiver-private-pw"]
    for whsec in stack.webhook_secrets:
        secrets += [whsec, whsec.removeprefix("whsec_")]
        secrets.append(base64.b64decode(whsec.removeprefix("whsec_")).hex())
    # The API runs in this process beside the test's own clients (whose debug logs show what
    # the test sent): keep the relay's and its server's records.
    relay_records = [
        f"{record.name} {record.getMessage()} {record.__dict__}"
        for record in caplog.records
        if record.name.startswith(("relay", "uvicorn", "starlette", "arq"))
    ]
    assert relay_records, "the API logged something"
    texts = {
        "api logs": "\n".join(relay_records),
        "error answers": " ".join(answer.text for answer in answers),
        "callbacks": " ".join(c.body.decode() + repr(c.headers) for c in callbacks),
    }
    texts.update({str(path): path.read_text() for path in stack.worker_logs})
    assert any("callback failed" in text for text in texts.values()), "the run logged failures"
    for where, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"a secret leaked into {where}"
