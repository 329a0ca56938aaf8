"""Callers as tenants, step one: the callers file (its checks, its reloading without a restart)
and every job recording the caller that submitted or watched it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import cast

import httpx
import pytest
from chamelaion import Chamelaion
from pydantic import SecretStr
from redis.asyncio import Redis

from relay.callers.model import DEFAULT_CALLER, CallersError, from_api_keys, read_callers
from relay.callers.source import CallerSource, load_file
from relay.errors import ConfigError
from relay.jobs.intents import Intents
from relay.jobs.store import JobStore
from relay.redis import keys
from relay.settings import Settings, load_settings
from tests.helpers import AUDIO, VIDEO, Api, running_api
from tests.stack import SANDBOX_KEY, eventually, job_field, new_secret

DUBBING_KEY = "dubbing-key-0123456789abcdef"
ONCALL_KEY = "oncall-admin-key-0123456789"
NEWS_KEY = "news-key-0123456789abcdef"
SECRET_LOOKING = "very-secret-key-do-not-log-0123"


def digest(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def two_callers() -> dict[str, object]:
    return {
        "callers": [
            {
                "name": "dubbing",
                "keys": [DUBBING_KEY, digest("dubbing-second-key-0123")],
                "webhook_secrets": [new_secret()],
                "callback_hosts": ["*.dubbing.svc.cluster.local"],
                "share": 2,
                "max_outstanding": 20000,
                "submit_rate": 50,
            },
            {"name": "oncall", "keys": [digest(ONCALL_KEY)], "role": "admin"},
        ]
    }


# --- The file's contents ------------------------------------------------------------------------


def test_a_callers_file_is_read_with_every_field() -> None:
    book = read_callers(two_callers())
    assert book.names == ("dubbing", "oncall")
    dubbing = book.resolve(DUBBING_KEY)
    assert dubbing is not None and dubbing.name == "dubbing" and not dubbing.admin
    assert book.resolve("dubbing-second-key-0123") is dubbing, "a sha256: digest is a key too"
    assert (dubbing.share, dubbing.max_outstanding, dubbing.submit_rate) == (2.0, 20000, 50.0)
    assert dubbing.callback_hosts == ("*.dubbing.svc.cluster.local",)
    assert len(dubbing.webhook_secrets) == 1
    oncall = book.resolve(ONCALL_KEY)
    assert oncall is not None and oncall.admin
    # Unset fields: the global settings apply (None), a share of 1, any host, global secrets.
    assert (oncall.share, oncall.max_outstanding, oncall.submit_rate) == (1.0, None, None)
    assert oncall.callback_hosts == () and oncall.webhook_secrets == ()
    assert book.resolve(NEWS_KEY) is None


def test_callback_hosts_are_globs_over_whole_host_names() -> None:
    dubbing = read_callers(two_callers()).named("dubbing")
    assert dubbing is not None
    assert dubbing.allows_host("hooks.dubbing.svc.cluster.local")
    assert dubbing.allows_host("HOOKS.Dubbing.svc.cluster.local.")
    assert not dubbing.allows_host("dubbing.svc.cluster.local.evil.example")
    assert not dubbing.allows_host("news.svc.cluster.local")


def with_caller(**fields: object) -> dict[str, object]:
    return {"callers": [{"name": "news", "keys": [NEWS_KEY], **fields}]}


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ([], 'one field, "callers"'),
        ({"callers": []}, "non-empty list"),
        ({"callers": [{"keys": [NEWS_KEY]}]}, "caller #1: name is required"),
        (with_caller(name="News Team"), "name is required"),
        (with_caller(keys=[]), "keys must list at least one key"),
        (with_caller(keys=["short-key"]), "key #1 is shorter than 16 characters"),
        (with_caller(keys=["sha256:abc"]), "key #1 is not sha256: and 64 hex digits"),
        (with_caller(role="root"), "role must be one of caller, admin"),
        (with_caller(webhook_secrets=["plain"]), "webhook secret #1 must start with whsec_"),
        (with_caller(share=0), "share must be a finite number above 0"),
        (with_caller(share=True), "share must be a finite number above 0"),
        (with_caller(submit_rate="fast"), "submit_rate must be a finite number above 0"),
        (with_caller(max_outstanding=2.5), "max_outstanding must be a whole number"),
        (with_caller(callback_hosts=["a/b"]), "is not a host name or glob"),
        (with_caller(colour="blue"), "unknown field(s) colour"),
        (
            {"callers": [{"name": "a", "keys": [NEWS_KEY]}, {"name": "a", "keys": [ONCALL_KEY]}]},
            "caller 'a': the name is used twice",
        ),
        (
            {"callers": [{"name": "a", "keys": [NEWS_KEY]}, {"name": "b", "keys": [NEWS_KEY]}]},
            "caller 'b': a key is listed twice",
        ),
        (
            {
                "callers": [
                    {"name": "a", "keys": [NEWS_KEY]},
                    {"name": "b", "keys": [digest(NEWS_KEY)]},
                ]
            },
            "caller 'b': a key is listed twice",
        ),
    ],
)
def test_an_unusable_file_says_what_is_wrong(data: object, problem: str) -> None:
    with pytest.raises(CallersError) as raised:
        read_callers(data)
    assert problem in str(raised.value)
    assert NEWS_KEY not in str(raised.value) and ONCALL_KEY not in str(raised.value)


@pytest.mark.parametrize("name", ["callers.yaml", "callers.yml", "callers"])
def test_yaml_files_are_read_and_their_errors_never_quote_a_key(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text(f"callers:\n  - name: news\n    keys: ['{NEWS_KEY}']\n    share: 3\n")
    news = load_file(path).named("news")
    assert news is not None and news.share == 3.0
    path.write_text(f"callers:\n  - name: news\n    keys: [{SECRET_LOOKING}\n")
    with pytest.raises(CallersError) as raised:
        load_file(path)
    assert "is not valid YAML near line" in str(raised.value)
    assert SECRET_LOOKING not in str(raised.value)


def test_json_errors_never_quote_a_key(tmp_path: Path) -> None:
    path = tmp_path / "callers.json"
    path.write_text('{"callers": [{"name": "news", "keys": ["' + SECRET_LOOKING + '" ]]}')
    with pytest.raises(CallersError) as raised:
        load_file(path)
    assert str(raised.value) == "is not valid JSON near line 1"


# --- Settings -----------------------------------------------------------------------------------


def test_api_keys_alone_are_one_admin_caller() -> None:
    book = from_api_keys((SecretStr(NEWS_KEY), SecretStr(ONCALL_KEY)))
    assert book.resolve(NEWS_KEY) is book.resolve(ONCALL_KEY) is book.named(DEFAULT_CALLER)
    caller = book.named(DEFAULT_CALLER)
    assert caller is not None and caller.admin


def test_a_callers_file_replaces_api_keys(tmp_path: Path) -> None:
    path = tmp_path / "callers.json"
    path.write_text(json.dumps(two_callers()))
    base = {"CHAMELAION_API_KEY": "upstream-key", "RELAY_CALLERS_FILE": str(path)}
    load_settings(**base).require("api")  # no RELAY_API_KEYS needed
    with pytest.raises(ConfigError) as raised:
        load_settings(**base, RELAY_API_KEYS=NEWS_KEY).require("api")
    assert "RELAY_API_KEYS" in str(raised.value) and NEWS_KEY not in str(raised.value)


def test_a_bad_callers_file_stops_the_start_up(tmp_path: Path) -> None:
    path = tmp_path / "callers.json"
    path.write_text(json.dumps(with_caller(keys=["short-key"])))
    with pytest.raises(ConfigError) as raised:
        CallerSource.from_settings(load_settings(RELAY_CALLERS_FILE=str(path)))
    assert "RELAY_CALLERS_FILE" in str(raised.value) and "key #1 is shorter" in str(raised.value)
    with pytest.raises(ConfigError, match="cannot be read"):
        CallerSource.from_settings(load_settings(RELAY_CALLERS_FILE=str(tmp_path / "none")))


# --- Reloading ----------------------------------------------------------------------------------


def replace_file(path: Path, data: object) -> None:
    """As Kubernetes updates a mounted Secret: a new file swapped in whole (a new inode)."""
    fresh = path.with_suffix(".new")
    fresh.write_text(data if isinstance(data, str) else json.dumps(data))
    os.replace(fresh, path)


def test_a_changed_file_is_taken_and_a_bad_one_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "callers.json"
    path.write_text(json.dumps(two_callers()))
    source = CallerSource.from_settings(load_settings(RELAY_CALLERS_FILE=str(path)))
    assert source.refresh() is False, "nothing changed"
    replace_file(path, with_caller())
    assert source.refresh() is True
    assert source.book.names == ("news",)
    with caplog.at_level(logging.ERROR, logger="relay.callers.source"):
        replace_file(path, with_caller(keys=[SECRET_LOOKING, "sha256:nothex"]))
        assert source.refresh() is False
    assert source.book.names == ("news",), "the last good file stays in force"
    [line] = caplog.records
    assert "refused" in line.getMessage() and "key #2 is not sha256:" in line.getMessage()
    assert SECRET_LOOKING not in caplog.text


@pytest.fixture
def callers_file(tmp_path: Path) -> Path:
    path = tmp_path / "callers.json"
    path.write_text(json.dumps(two_callers()))
    return path


@pytest.fixture
def api(redis_url: str, callers_file: Path) -> Iterator[Api]:
    with running_api(redis_url, RELAY_API_KEYS="", RELAY_CALLERS_FILE=str(callers_file)) as api:
        yield api


def status_with(api: Api, key: str) -> int:
    return httpx.get(
        api.url + "/api/v1/lipsync/requests/no-such-job", headers={"x-api-key": key}
    ).status_code


def test_the_running_api_takes_a_changed_file_without_a_restart(
    api: Api, callers_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert status_with(api, DUBBING_KEY) == 404  # past the key check: the job is unknown
    assert status_with(api, NEWS_KEY) == 401
    changed = two_callers()
    changed["callers"] = [{"name": "news", "keys": [NEWS_KEY]}, changed["callers"][1]]  # type: ignore[index]
    replace_file(callers_file, changed)
    eventually(lambda: status_with(api, NEWS_KEY) == 404)
    assert status_with(api, DUBBING_KEY) == 401, "a removed key is refused"
    # A malformed file is kept out: the keys in force still work, none of its own does.
    with caplog.at_level(logging.ERROR, logger="relay.callers.source"):
        replace_file(callers_file, '{"callers": [{"name": "dubbing", "keys": ["' + DUBBING_KEY)
        # The API looks at the file on a request: once it has logged the refusal, it has seen it.
        eventually(lambda: status_with(api, NEWS_KEY) == 404 and "refused" in caplog.text)
    assert DUBBING_KEY not in caplog.text
    assert status_with(api, DUBBING_KEY) == 401
    replace_file(callers_file, two_callers())
    eventually(lambda: status_with(api, DUBBING_KEY) == 404)
    assert status_with(api, NEWS_KEY) == 401


# --- Jobs know their caller ---------------------------------------------------------------------


def test_a_submitted_job_records_its_caller(api: Api) -> None:
    for key, caller in [(DUBBING_KEY, b"dubbing"), (ONCALL_KEY, b"oncall")]:
        sdk = Chamelaion(api_key=key, base_url=api.url + "/api", max_retries=0)
        result = sdk.lipsync.generate(
            inputs=[{"type": "video", "url": VIDEO}, {"type": "audio", "url": AUDIO}]
        )
        assert job_field(api.redis_url, result.request_id, "caller") == caller


def test_a_watched_job_records_its_caller(api: Api) -> None:
    created = httpx.post(
        api.sandbox_url + "/api/v1/lipsync/generate",
        json={"inputs": [{"type": "video", "url": VIDEO}, {"type": "audio", "url": AUDIO}]},
        headers={"x-api-key": SANDBOX_KEY},
    )
    request_id = created.json()["request_id"]
    watched = httpx.post(
        api.url + "/api/relay/v1/watches",
        json={"request_id": request_id, "callback_url": "http://127.0.0.1:9/hook"},
        headers={"x-api-key": ONCALL_KEY},
    )
    assert watched.status_code == 201, watched.text
    assert job_field(api.redis_url, request_id, "caller") == b"oncall"


async def test_an_adopted_job_is_its_intents_callers(redis: Redis) -> None:
    store = JobStore(redis)
    intents = Intents(redis, store, Settings.model_validate({}))
    intent, _ = await intents.open(
        reference_id="dub-42",
        idempotency_key=None,
        callback_url=None,
        events=None,
        metadata=None,
        caller="dubbing",
    )
    # The reconcile adopts from what the intent's record holds: the caller is in it.
    record = await cast(Awaitable[dict[bytes, bytes]], redis.hgetall(keys.intent(intent.id)))
    assert record.get(b"caller") == b"dubbing"
    assert await intents.adopt(intent, "req-adopted")
    job = await store.get("req-adopted")
    assert job is not None and job.caller == "dubbing"
