"""The HTTP API against the sandbox over real HTTP: auth, validation, error mapping, proxying."""

from __future__ import annotations

import concurrent.futures
import http.client
import re
from collections.abc import Iterator

import chamelaion
import httpx
import orjson
import pytest
import redis
from starlette.routing import Route

from relay.api.app import create_app
from relay.devtools.ports import free_port
from relay.serving import api_options
from relay.settings import DEFAULT_ALLOWED_PORTS, load_settings
from tests.helpers import Api, running_api
from tests.servers import serve
from tests.stack import (
    RELAY_KEY,
    SANDBOX_KEY,
    eventually,
    is_up,
    job_fields,
    relay_stack,
)

GOOD = {
    "inputs": [
        {"type": "video", "url": "https://cdn.example.com/v.mp4"},
        {"type": "audio", "url": "https://cdn.example.com/a.wav"},
    ]
}


@pytest.fixture
def api(redis_url: str) -> Iterator[Api]:
    with running_api(redis_url, RELAY_MAX_BODY_BYTES="4096") as running:
        yield running


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "missing authorization header"),
        ({"x-api-key": "nope"}, "unauthorized"),
        ({"authorization": "Basic abc"}, "invalid authorization format"),
        ({"authorization": "Bearer"}, "missing token"),
        ({"authorization": "Bearer nope"}, "invalid token"),
    ],
)
def test_refused_keys_get_chamelaions_401_bodies(
    api: Api, headers: dict[str, str], message: str
) -> None:
    response = httpx.post(api.url + "/api/v1/lipsync/generate", json=GOOD, headers=headers)
    assert response.status_code == 401
    assert response.json() == {"error": message}
    assert api.upstream_calls("POST /v1/lipsync/generate") == 0


def test_both_key_styles_are_accepted(api: Api) -> None:
    assert api.post(GOOD).status_code == 200
    response = httpx.post(
        api.url + "/api/v1/lipsync/generate",
        json=GOOD,
        headers={"authorization": f"Bearer {RELAY_KEY}"},
    )
    assert response.status_code == 200
    assert response.json()["status"] == "success"


def test_sdk_with_a_wrong_key_gets_an_authentication_error(api: Api) -> None:
    client = chamelaion.Chamelaion(api_key="wrong", base_url=api.url + "/api", max_retries=0)
    with pytest.raises(chamelaion.AuthenticationError):
        client.lipsync.generate(inputs=GOOD["inputs"])  # type: ignore[arg-type]


BAD_BODIES: list[tuple[str, object, int, str]] = [
    ("not an object", [1, 2], 400, "JSON object"),
    ("no inputs", {}, 422, "inputs"),
    ("two videos", {"inputs": [GOOD["inputs"][0], GOOD["inputs"][0]]}, 422, "inputs"),
    ("one input", {"inputs": [GOOD["inputs"][0]]}, 422, "inputs"),
    (
        "image input",
        {"inputs": [{"type": "image", "url": "https://x/y"}, GOOD["inputs"][1]]},
        422,
        "inputs.0.type",
    ),
    (
        "ftp url",
        {"inputs": [{"type": "video", "url": "ftp://x/y"}, GOOD["inputs"][1]]},
        422,
        "inputs.0.url",
    ),
    ("bad callback", {**GOOD, "callback_url": "javascript:alert(1)"}, 422, "callback_url"),
    (
        "long callback",
        {**GOOD, "callback_url": "https://x.example/" + "a" * 2050},
        422,
        "callback_url",
    ),
    ("unknown field", {**GOOD, "callbak_url": "https://x.example/"}, 422, "callbak_url"),
    (
        "string bool",
        {**GOOD, "disable_active_speaker_detection": "yes"},
        422,
        "disable_active_speaker_detection",
    ),
    ("long reference", {**GOOD, "reference_id": "r" * 300}, 422, "reference_id"),
]


@pytest.mark.parametrize(
    ("case", "body", "status", "field"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES]
)
def test_bad_bodies_are_refused_before_upstream_and_redis(
    api: Api, case: str, body: object, status: int, field: str
) -> None:
    response = api.post(body)
    assert response.status_code == status, response.text
    assert field in response.json()["error"]
    assert api.upstream_calls("POST /v1/lipsync/generate") == 0
    assert api.tracked() == []


def test_malformed_json_and_oversized_bodies(api: Api) -> None:
    response = api.post(content=b"{not json", **{"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json() == {"error": "request body is not valid JSON"}
    response = api.post(content=b" " * 5000)
    assert response.status_code == 413
    assert api.upstream_calls("POST /v1/lipsync/generate") == 0


def test_accepted_job_is_tracked_and_only_documented_fields_go_upstream(api: Api) -> None:
    body = {
        **GOOD,
        "reference_id": "ref-1",
        "callback_url": "http://localhost:9/x",
        "disable_active_speaker_detection": True,
    }
    response = api.post(body)
    assert response.status_code == 200
    request_id = response.json()["request_id"]
    sent = httpx.get(f"{api.sandbox_url}/_sandbox/requests/{request_id}/body").json()
    assert sent == {k: v for k, v in body.items() if k != "callback_url"}
    job = job_fields(api.redis_url, request_id)
    assert job[b"callback_url"] == b"http://localhost:9/x"
    assert job[b"reference_id"] == b"ref-1"


def test_upstream_rejecting_the_relays_key_is_reported_as_the_relays_problem(
    redis_url: str,
) -> None:
    with running_api(redis_url) as running:
        settings = load_settings(
            CHAMELAION_BASE_URL=running.sandbox_url + "/api",
            CHAMELAION_API_KEY="revoked",
            RELAY_REDIS_URL=redis_url,
            RELAY_API_KEYS=RELAY_KEY,
        )
        with serve(create_app(settings), **api_options(settings)) as url:
            response = httpx.post(
                url + "/api/v1/lipsync/generate", json=GOOD, headers={"x-api-key": RELAY_KEY}
            )
    assert response.status_code == 502
    assert "CHAMELAION_API_KEY" in response.json()["error"]
    assert "revoked" not in response.text
    assert running.tracked() == []


@pytest.mark.parametrize(
    ("fault", "status", "retry_after"),
    [({"status": 429, "retry_after": 7}, 429, "7"), ({"status": 500}, 502, None)],
)
def test_upstream_errors_map_to_clear_relay_errors(
    api: Api, fault: dict[str, object], status: int, retry_after: str | None
) -> None:
    httpx.post(
        api.sandbox_url + "/_sandbox/faults", json={**fault, "count": 1, "paths": "generate"}
    )
    response = api.post(GOOD)
    assert response.status_code == status
    assert response.headers.get("retry-after") == retry_after
    assert "error" in response.json()
    assert api.tracked() == []


def test_untracked_requests_and_lists_are_proxied(api: Api) -> None:
    headers = {"x-api-key": RELAY_KEY}
    missing = httpx.get(api.url + "/api/v1/lipsync/requests/unknown-id", headers=headers)
    assert missing.status_code == 404
    assert missing.json() == {"error": "lipsync request not found"}
    httpx.post(
        api.sandbox_url + "/api/v1/lipsync/generate",
        json={**GOOD, "reference_id": "direct"},
        headers={"x-api-key": SANDBOX_KEY},
    )
    listed = httpx.get(
        api.url + "/api/v1/lipsync/requests",
        params={"limit": 5, "reference_id": "direct"},
        headers=headers,
    )
    assert listed.status_code == 200
    assert listed.json()["pagination"] == {"limit": 5, "offset": 0, "total": 1}
    by_ref = httpx.get(api.url + "/api/v1/lipsync/requests/direct", headers=headers)
    assert by_ref.status_code == 200 and by_ref.json()["reference_id"] == "direct"


@pytest.mark.parametrize(
    "params",
    [{"limit": "0"}, {"limit": "-1"}, {"offset": "x"}, {"limit": "99999999"}, {"limit": "²"}],
)
def test_bad_list_parameters_are_refused(api: Api, params: dict[str, str]) -> None:
    response = httpx.get(
        api.url + "/api/v1/lipsync/requests", params=params, headers={"x-api-key": RELAY_KEY}
    )
    assert response.status_code == 400
    assert api.upstream_calls("GET /v1/lipsync/requests") == 0


def test_overlong_ids_are_refused(api: Api) -> None:
    response = httpx.get(
        api.url + "/api/v1/lipsync/requests/" + "x" * 300, headers={"x-api-key": RELAY_KEY}
    )
    assert response.status_code == 400


def test_health_and_readiness(api: Api) -> None:
    assert httpx.get(api.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(api.url + "/readyz").status_code == 200
    assert httpx.get(api.url + "/nowhere").json() == {"error": "Not Found"}


def test_without_redis_the_api_is_unready_and_creates_nothing_upstream(redis_url: str) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    with running_api(dead_redis) as running:
        assert httpx.get(running.url + "/readyz").status_code == 503
        response = running.post(GOOD)
        assert response.status_code == 503
        assert running.upstream_calls("POST /v1/lipsync/generate") == 0


def test_a_redis_that_answers_but_refuses_writes_creates_nothing_upstream(redis_url: str) -> None:
    # PING would pass here: only a write shows the job could not be recorded.
    client = redis.Redis.from_url(redis_url)
    with running_api(redis_url) as running:
        client.config_set("min-replicas-to-write", 1)
        try:
            assert client.ping()
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                statuses = list(pool.map(lambda _: running.post(GOOD).status_code, range(16)))
            assert statuses == [503] * 16
            assert running.upstream_calls("POST /v1/lipsync/generate") == 0
        finally:
            client.config_set("min-replicas-to-write", 0)
        assert running.post(GOOD).status_code == 200
        assert running.upstream_calls("POST /v1/lipsync/generate") == 1
        assert len(running.tracked()) == 1


REFUSED_CALLBACKS = [
    "http://127.0.0.1/hook",
    "http://0x7f000001/hook",
    "http://2130706433/hook",
    "http://127.1/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://169.254.169.254/latest/meta-data",
    "http://metadata.google.internal/",
    "http://localhost/hook",
    "http://user:secret@10.0.0.7/hook",
    # Finding 1: Linode/Akamai and Oracle metadata over IPv6, inside the allowed fc00::/7.
    "http://[fd00:a9fe:a9fe::1]/v1/instance",
    "http://[fd00:c1::a9fe:a9fe]/opc/v2/instance/",
    # Finding 2: a kubelet, the worker's own metrics port, the API server's SRV-style name.
    "http://10.1.2.3:10250/pods",
    "http://10.1.2.3:9100/metrics",
    "http://10.1.2.3:8000/api/v1/lipsync/requests",
    "https://_https._tcp.kubernetes.default.svc.cluster.local/api/v1/namespaces",
]


@pytest.mark.parametrize("callback_url", REFUSED_CALLBACKS)
def test_default_policy_refuses_internal_targets_before_upstream(
    redis_url: str, callback_url: str
) -> None:
    with running_api(
        redis_url,
        RELAY_CALLBACK_ALLOWED_NETWORKS="",
        RELAY_CALLBACK_ALLOWED_PORTS=DEFAULT_ALLOWED_PORTS,
    ) as running:
        response = running.post({**GOOD, "callback_url": callback_url})
        assert response.status_code == 422, response.text
        assert "callback_url" in response.json()["error"]
        assert "secret" not in response.text
        assert running.upstream_calls("POST /v1/lipsync/generate") == 0
        assert running.tracked() == []


def test_the_relays_own_ports_stay_refused_when_every_port_is_allowed(redis_url: str) -> None:
    with running_api(
        redis_url,
        RELAY_CALLBACK_ALLOWED_NETWORKS="",
        RELAY_CALLBACK_ALLOWED_PORTS="1-65535",
        RELAY_WORKER_HTTP_PORT="9100",
        RELAY_API_PORT="8000",
    ) as running:
        for port in (9100, 8000):
            response = running.post({**GOOD, "callback_url": f"http://10.1.2.3:{port}/metrics"})
            assert response.status_code == 422, response.text
            assert "own ports" in response.json()["error"]
        assert running.upstream_calls("POST /v1/lipsync/generate") == 0


def test_the_charts_denied_networks_refuse_the_api_server(redis_url: str) -> None:
    # Finding 2: the chart's default denied list (values.yaml callbackPolicy) closes the
    # cluster's API server address and the node range; the same values, set by hand here.
    with running_api(
        redis_url,
        RELAY_CALLBACK_ALLOWED_NETWORKS="",
        RELAY_CALLBACK_DENIED_NETWORKS="10.96.0.1/32,10.0.0.0/16",
        RELAY_CALLBACK_ALLOWED_PORTS=DEFAULT_ALLOWED_PORTS,
    ) as running:
        for url in ("https://10.96.0.1:443/api/v1/namespaces", "http://10.0.3.4/pods"):
            response = running.post({**GOOD, "callback_url": url})
            assert response.status_code == 422, response.text
        assert running.upstream_calls("POST /v1/lipsync/generate") == 0


def test_default_policy_admits_private_receivers(redis_url: str) -> None:
    with running_api(redis_url, RELAY_CALLBACK_ALLOWED_NETWORKS="") as running:
        response = running.post({**GOOD, "callback_url": "http://10.1.2.3:8080/hook"})
        assert response.status_code == 200, response.text
        assert len(running.tracked()) == 1


DOT_SEGMENTS = [
    ".",
    "..",
    "%2e",
    "%2E%2e",
    ".%2e",
    "%2e.",
    "%252e%252e",
    "a%2f..",
    "..%5c",
    "%ef%bc%8e%ef%bc%8e",  # full-width full stops: ".." once NFKC-normalised
]


@pytest.mark.parametrize("value", DOT_SEGMENTS)
def test_path_parameters_that_are_or_become_other_paths_never_reach_upstream(
    api: Api, value: str
) -> None:
    # Finding 4: `/requests/..` made the relay GET `/v1/lipsync` upstream with its own key.
    app = create_app(load_settings(CHAMELAION_API_KEY="x", RELAY_API_KEYS=RELAY_KEY))
    templates = [
        route.path for route in app.routes if isinstance(route, Route) and "{" in route.path
    ]
    assert templates, "some route takes a path parameter"
    before = httpx.get(api.sandbox_url + "/_sandbox/stats").json()["calls"]
    host, port = api.url.removeprefix("http://").split(":")
    for template in templates:
        path = re.sub(r"\{[^}]+\}", value, template)
        # http.client sends the path as written: httpx would resolve the dot segments itself.
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            connection.request("GET", path, headers={"x-api-key": RELAY_KEY})
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        assert 400 <= response.status < 500, (path, response.status, body)
        assert "error" in orjson.loads(body)
    assert httpx.get(api.sandbox_url + "/_sandbox/stats").json()["calls"] == before


def test_metrics_are_open_by_default_and_need_a_key_when_asked(redis_url: str) -> None:
    # Finding 9: /metrics auth is the operator's choice (off: Prometheus scrapes in-cluster).
    with running_api(redis_url) as running:
        assert httpx.get(running.url + "/metrics").status_code == 200
    with running_api(redis_url, RELAY_METRICS_AUTH="true") as running:
        refused = httpx.get(running.url + "/metrics")
        assert refused.status_code == 401
        assert refused.json() == {"error": "missing authorization header"}
        answered = httpx.get(running.url + "/metrics", headers={"x-api-key": RELAY_KEY})
        assert answered.status_code == 200
        assert "relay_uploads_in_progress" in answered.text
        assert httpx.get(running.url + "/healthz").status_code == 200


def test_a_workers_metrics_need_a_key_when_asked(redis_url: str) -> None:
    with relay_stack(redis_url, workers=0, env={"RELAY_METRICS_AUTH": "true"}) as stack:
        stack.start_worker()
        url = stack.worker_urls[0]
        eventually(lambda: is_up(url))
        assert httpx.get(url + "/metrics").status_code == 401
        assert httpx.get(url + "/metrics", headers={"x-api-key": RELAY_KEY}).status_code == 200
