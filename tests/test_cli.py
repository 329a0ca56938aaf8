"""The `relay` command as operators and developers run it: config errors, and `relay dev`."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import httpx
import pytest
from chamelaion import Chamelaion

from relay.devtools.ports import free_port
from tests.helpers import clean_env, relay_dev
from tests.stack import RELAY_KEY as LONG_KEY
from tests.stack import eventually, new_secret, serving


def run_relay(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("command", "env", "variable"),
    [
        ("api", {"RELAY_API_KEYS": LONG_KEY}, "CHAMELAION_API_KEY"),
        ("api", {"CHAMELAION_API_KEY": "x"}, "RELAY_API_KEYS"),
        ("worker", {"CHAMELAION_API_KEY": "x"}, "RELAY_WEBHOOK_SECRETS"),
        (
            "api",
            {
                "CHAMELAION_API_KEY": "x",
                "RELAY_API_KEYS": LONG_KEY,
                "RELAY_POLL_MIN_INTERVAL": "soon",
            },
            "RELAY_POLL_MIN_INTERVAL",
        ),
        (
            "api",
            {
                "CHAMELAION_API_KEY": "x",
                "RELAY_API_KEYS": LONG_KEY,
                "RELAY_REDIS_URL": "http://redis",
            },
            "RELAY_REDIS_URL",
        ),
        (
            "worker",
            {"CHAMELAION_API_KEY": "x", "RELAY_WEBHOOK_SECRETS": "whsec_!!not-base64-secret!!"},
            "RELAY_WEBHOOK_SECRETS",
        ),
        (
            "worker",
            {"CHAMELAION_API_KEY": "x", "RELAY_JOB_RETENTION": "3600"},
            "RELAY_JOB_RETENTION",
        ),
        ("worker", {"CHAMELAION_API_KEY": "x", "RELAY_LOG_LEVEL": "verbose"}, "RELAY_LOG_LEVEL"),
        (
            "api",
            {
                "CHAMELAION_API_KEY": "x",
                "RELAY_API_KEYS": LONG_KEY,
                "RELAY_CALLBACK_ALLOWED_NETWORKS": "10.0.0.0/33",
            },
            "RELAY_CALLBACK_ALLOWED_NETWORKS",
        ),
        # Finding 9: a guessable caller key stops start-up.
        ("api", {"CHAMELAION_API_KEY": "x", "RELAY_API_KEYS": f"{LONG_KEY},k"}, "RELAY_API_KEYS"),
        (
            "api",
            {
                "CHAMELAION_API_KEY": "x",
                "RELAY_API_KEYS": LONG_KEY,
                "RELAY_CALLBACK_ALLOWED_PORTS": "443,70000",
            },
            "RELAY_CALLBACK_ALLOWED_PORTS",
        ),
    ],
)
def test_bad_configuration_stops_start_up_naming_the_variable(
    command: str, env: dict[str, str], variable: str
) -> None:
    result = run_relay(command, env=clean_env(**env))
    assert result.returncode == 2
    assert f"configuration error: {variable}" in result.stderr
    for name, value in env.items():
        if name.endswith(("_KEY", "_KEYS", "_SECRETS", "REDIS_URL")) and len(value) > 2:
            assert value not in result.stderr, "configuration errors never echo secrets"


@pytest.mark.parametrize(
    "base_url",
    [
        "https://relay:sekrit-upstream-key@api.example.com/api",
        "https://api.example.com/api?key=sekrit-upstream-key",
        "https://api.example.com/api#sekrit-upstream-key",
    ],
)
def test_a_base_url_carrying_a_credential_stops_start_up_without_echoing_it(base_url: str) -> None:
    # Its key has a variable of its own: a credential in the URL would go, with the URL, into
    # every create's span (url.full) and any error that names the URL.
    result = run_relay(
        "worker", env=clean_env(CHAMELAION_API_KEY="x", CHAMELAION_BASE_URL=base_url)
    )
    assert result.returncode == 2
    assert "configuration error: CHAMELAION_BASE_URL" in result.stderr
    assert "sekrit" not in result.stderr


def test_relay_dev_runs_everything_and_its_inbox_verifies_callbacks() -> None:
    with relay_dev() as (port, banner):
        key = re.search(r"key: (\S+)\)", banner)
        inbox = re.search(r"inbox\s+(\S+)", banner)
        assert key and inbox, banner
        client = Chamelaion(
            api_key=key.group(1), base_url=f"http://127.0.0.1:{port}/api", max_retries=0
        )
        job = client.lipsync.generate(
            inputs=[
                {"type": "video", "url": "https://cdn.example.com/a.mp4"},
                {"type": "audio", "url": "https://cdn.example.com/a.wav"},
            ],
            extra_body={"callback_url": inbox.group(1)},
        )

        def delivered() -> list[dict[str, object]]:
            received: list[dict[str, object]] = httpx.get(inbox.group(1)).json()["received"]
            return received

        [entry] = eventually(delivered, timeout=30)
        assert entry["verified"] is True
        payload = entry["payload"]
        assert isinstance(payload, dict)
        assert payload["type"] == "lipsync.completed"
        assert payload["data"]["id"] == job.request_id


def test_worker_stops_cleanly_on_sigterm(redis_url: str) -> None:
    http_port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay.cli", "worker"],
        env=clean_env(
            CHAMELAION_API_KEY="x",
            RELAY_REDIS_URL=redis_url,
            RELAY_WEBHOOK_SECRETS=new_secret(),
            RELAY_WORKER_HTTP_PORT=str(http_port),
        ),
    )
    try:
        serving(proc, f"http://127.0.0.1:{http_port}")
    except Exception:
        proc.kill()
        raise
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def test_relay_dev_never_prints_a_key_from_the_environment() -> None:
    # Finding 9: the banner shows only a key `relay dev` generated itself.
    with relay_dev(RELAY_API_KEYS=LONG_KEY) as (_, banner):
        pass
    assert "key: one of RELAY_API_KEYS" in banner
    assert LONG_KEY not in banner
