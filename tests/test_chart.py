"""The Helm chart, checked without a cluster.

Helm's own engine (helm-python-sdk: Helm 4's Go SDK behind ctypes) lints the chart, checks
values against values.schema.json and renders it with the default values, the production-like
values file and a small install with every optional feature on. Every rendered manifest is
validated against the Kubernetes schemas (kubernetes-validate, strict) or, for the KEDA and
Prometheus Operator kinds, against their generated models; checkov scans the renders once per
module. The other tests pin the process contract: components, probes, drain times, security.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from relay.delivery.netpolicy import callback_policy
from relay.settings import load_settings
from tests.chart_values import RECEIVERS, with_receivers

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "chamelaion-relay"
PRODUCTION_VALUES = ROOT / "helm" / "values-production.yaml"
DOCS = ROOT / "docs" / "kubernetes.md"
RELEASE = "relay"
NAMESPACE = "relay"
FULLNAME = "relay-chamelaion-relay"
# The chart's minimum (Chart.yaml kubeVersion) and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.30.0", "1.37.0")
# checkov runs in its own tool environment: its ~90 dependencies would otherwise pin the
# project's test tools (it downgrades pytest and packaging). --exclude-newer freezes the
# transitive resolution, so the scan is as reproducible as a lock file.
EXCLUDE_NEWER = ("--exclude-newer", "2026-11-21T00:00:00Z")
CHECKOV = (*EXCLUDE_NEWER, "--from", "checkov==3.3.30", "checkov")
# Pydantic models generated from the KEDA and Prometheus Operator CRDs, for the two custom
# kinds kubernetes-validate has no schema for. Isolated too: cloudcoil registers a pytest
# plugin that would load into this test session.
CRD_MODELS = (
    *EXCLUDE_NEWER,
    "--with", "cloudcoil-models-keda==2.16.1.0",
    "--with", "cloudcoil-models-prometheus-operator==0.80.1.0",
)  # fmt: skip

Manifest = dict[str, Any]

SMALL_INSTALL: dict[str, Any] = {
    "secrets": {
        "chamelaionApiKey": "ck_test",
        "apiKeys": ["key-one", "key-two"],
        "webhookSecrets": ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
    },
    "redis": {"standalone": {"enabled": True}},
    "worker": {"keda": {"enabled": True}},
    "metrics": {
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True, "runbookUrl": "https://docs.example.com/ops.md"},
        "grafanaDashboard": {"enabled": True},
    },
    "networkPolicy": {"enabled": True},
    "config": {"callbackAllowedNetworks": RECEIVERS},
}


def production_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(PRODUCTION_VALUES.read_text())
    return values


VARIANTS: dict[str, Any] = {
    "default": with_receivers,
    "production": production_values,
    "small": lambda: copy.deepcopy(SMALL_INSTALL),
}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render_raw(
    chart: helm.Chart, values: dict[str, Any] | None = None, *, receivers: bool = True
) -> dict[str, str]:
    """`receivers`: add the receivers' networks every install must set (`with_receivers`)."""
    values = with_receivers(values) if receivers else values or {}
    return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def render(chart: helm.Chart, values: dict[str, Any] | None = None) -> list[Manifest]:
    manifests: list[Manifest] = []
    for path, text in sorted(render_raw(chart, values).items()):
        if path.endswith("NOTES.txt"):
            continue
        manifests.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return manifests


def notes(chart: helm.Chart, values: dict[str, Any] | None = None) -> str:
    return render_raw(chart, values)["chamelaion-relay/templates/NOTES.txt"]


def find(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    for manifest in manifests:
        if manifest["kind"] == kind and manifest["metadata"]["name"] == name:
            return manifest
    raise AssertionError(f"no {kind} {name} in {[kn(m) for m in manifests]}")


def of_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def kn(manifest: Manifest) -> str:
    return f"{manifest['kind']}/{manifest['metadata']['name']}"


def pod_spec(manifest: Manifest) -> dict[str, Any]:
    spec: dict[str, Any] = manifest["spec"]
    if manifest["kind"] == "Pod":
        return spec
    template_spec: dict[str, Any] = spec["template"]["spec"]
    return template_spec


def container(manifest: Manifest, name: str | None = None) -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod_spec(manifest)["containers"]
    if name is None:
        assert len(containers) == 1
        return containers[0]
    return next(c for c in containers if c["name"] == name)


def workloads(manifests: list[Manifest]) -> list[Manifest]:
    return [m for m in manifests if m["kind"] in {"Deployment", "StatefulSet", "Pod"}]


def env_value(manifests: list[Manifest], key: str) -> str:
    data: dict[str, str] = find(manifests, "ConfigMap", FULLNAME)["data"]
    return data[key]


# --- Helm's own checks ------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_lint_is_clean(variant: str) -> None:
    report = helm.lint(CHART, VARIANTS[variant](), strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    # Severity 1 is informational ("icon is recommended"); 2 and up are warnings and errors.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_schema_accepts_the_shipped_values(chart: helm.Chart, variant: str) -> None:
    chart.validate_schema(VARIANTS[variant]())


@pytest.mark.parametrize(
    "values",
    [
        {"replicaCount": 3},  # top-level typo of api.replicaCount
        {"api": {"replicaCout": 3}},
        {"worker": {"keda": {"enable": True}}},
        {"redis": {"standalone": {"persistance": {"size": "1Gi"}}}},
        {"config": {"logFormat": "xml"}},
        {"config": {"logLevel": "verbose"}},
        {"config": {"workerConcurrency": "100"}},
        {"secrets": {"webhookSecrets": ["not-a-whsec"]}},
        {"image": {"digest": "latest"}},
        {"redis": {"url": "http://redis:6379"}},
        {"api": {"resources": {"limits": {"gpu": 1}}}},
        {"metrics": {"prometheusRule": {"runbookUrl": "docs/operations.md"}}},
        {"metrics": {"prometheusRule": {"thresholds": {"apiErrorRatio": 5}}}},
        {"metrics": {"prometheusRule": {"disabled": ["RelayCallbackLate"]}}},
        {"metrics": {"grafanaDashboard": {"label": "grafana_dashboard"}}},
    ],
    ids=lambda values: json.dumps(values, separators=(",", ":")),
)
def test_schema_rejects_typos_and_bad_values(chart: helm.Chart, values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)
    # Install and template run the same check.
    with pytest.raises(helm.HelmValuesError):
        render(chart, values)


# --- Kubernetes schemas -----------------------------------------------------------------------

CUSTOM_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}

# Reads a JSON list of manifests, prints a JSON list of errors (null where valid). The models
# ignore unknown fields, so a manifest whose round trip differs has a field the CRD lacks.
CRD_CHECK = """
import json, sys
from cloudcoil.models.keda.v1alpha1 import ScaledObject
from cloudcoil.models.prometheus_operator.v1 import PrometheusRule, ServiceMonitor
models = {
    "ScaledObject": ScaledObject,
    "ServiceMonitor": ServiceMonitor,
    "PrometheusRule": PrometheusRule,
}
errors = []
for manifest in json.load(sys.stdin):
    try:
        parsed = models[manifest["kind"]].model_validate(manifest)
    except Exception as exc:
        errors.append(str(exc))
        continue
    dumped = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
    same = dumped == manifest
    errors.append(None if same else "unknown fields; the CRD keeps " + json.dumps(dumped))
json.dump(errors, sys.stdout)
"""

BAD_SCALED_OBJECT: Manifest = {
    "apiVersion": "keda.sh/v1alpha1",
    "kind": "ScaledObject",
    "metadata": {"name": "typo"},
    "spec": {"scaleTargetRef": {"name": "w"}, "triggers": [], "maxReplicas": 3},
}


def uv() -> str:
    path = os.environ.get("UV") or shutil.which("uv")
    assert path, "uv runs the isolated checkers (checkov, the CRD models)"
    return path


@pytest.fixture(scope="module")
def custom_resource_errors(chart: helm.Chart) -> dict[str, str | None]:
    """Every custom resource of every variant, validated in one run of the CRD models."""
    named = {
        f"{variant}: {kn(m)}": m
        for variant, values in VARIANTS.items()
        for m in render(chart, values())
        if (m["apiVersion"], m["kind"]) in CUSTOM_KINDS
    }
    named["self-test: a ScaledObject with a typo"] = BAD_SCALED_OBJECT
    result = subprocess.run(
        [uv(), "run", "--isolated", "--no-project", *CRD_MODELS, "python", "-c", CRD_CHECK],
        input=json.dumps(list(named.values())), capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(zip(named, json.loads(result.stdout), strict=True))


def test_custom_resources_match_their_crds(custom_resource_errors: dict[str, str | None]) -> None:
    assert custom_resource_errors.pop("self-test: a ScaledObject with a typo") is not None
    assert {kind.split(": ")[1] for kind in custom_resource_errors} == {
        f"ScaledObject/{FULLNAME}-worker",
        f"ServiceMonitor/{FULLNAME}-api",
        f"ServiceMonitor/{FULLNAME}-worker",
        f"PrometheusRule/{FULLNAME}",
    }
    assert {name: error for name, error in custom_resource_errors.items() if error} == {}


@pytest.mark.parametrize("variant", VARIANTS)
def test_manifests_match_kubernetes_schemas(chart: helm.Chart, variant: str) -> None:
    manifests = render(chart, VARIANTS[variant]())
    assert manifests
    for manifest in manifests:
        if (manifest["apiVersion"], manifest["kind"]) in CUSTOM_KINDS:
            continue  # test_custom_resources_match_their_crds
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(manifest, version, strict=True)


def test_kubernetes_validate_catches_mistakes() -> None:
    """The validator really rejects a misspelt field (so its passing means something)."""
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {"containers": [{"name": "c", "image": "i", "livenesProbe": {}}]},
            },
        },
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


# --- The process contract ---------------------------------------------------------------------


def test_two_deployments_from_one_image(chart: helm.Chart) -> None:
    manifests = render(chart)
    api = find(manifests, "Deployment", f"{FULLNAME}-api")
    worker = find(manifests, "Deployment", f"{FULLNAME}-worker")
    assert {m["metadata"]["name"] for m in of_kind(manifests, "Deployment")} == {
        f"{FULLNAME}-api",
        f"{FULLNAME}-worker",
    }
    for deployment, component in ((api, "api"), (worker, "worker")):
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector["app.kubernetes.io/component"] == component
        assert deployment["metadata"]["labels"]["app.kubernetes.io/component"] == component
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items()
    assert container(api)["image"] == container(worker)["image"] == "chamelaion-relay:0.1.0"
    assert [*container(api)["command"], *container(api)["args"]] == [
        "relay", "api", "--host", "0.0.0.0", "--port", "8000",
    ]  # fmt: skip
    assert [*container(worker)["command"], *container(worker)["args"]] == ["relay", "worker"]
    # The API Service selects only API pods.
    service = find(manifests, "Service", FULLNAME)
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "api"
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert container(api)["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]


def test_image_digest_wins_over_tag(chart: helm.Chart) -> None:
    manifests = render(chart, production_values())
    image = container(find(manifests, "Deployment", f"{FULLNAME}-api"))["image"]
    assert image == ("registry.example.com/platform/chamelaion-relay@sha256:" + "0" * 64)


def http_get(probe: dict[str, Any]) -> tuple[str, Any]:
    return probe["httpGet"]["path"], probe["httpGet"]["port"]


def test_probes(chart: helm.Chart) -> None:
    manifests = render(chart)
    api = container(find(manifests, "Deployment", f"{FULLNAME}-api"))
    assert http_get(api["livenessProbe"]) == ("/healthz", "http")
    assert http_get(api["readinessProbe"]) == ("/readyz", "http")
    assert http_get(api["startupProbe"]) == ("/healthz", "http")
    worker = container(find(manifests, "Deployment", f"{FULLNAME}-worker"))
    # The worker's /healthz answers 503 when its heartbeat is stale: liveness restarts a
    # stuck worker.
    assert http_get(worker["livenessProbe"]) == ("/healthz", "http-health")
    # Readiness fails while Redis is unreachable or lost its data; no restart would help.
    assert http_get(worker["readinessProbe"]) == ("/readyz", "http-health")
    assert worker["ports"] == [{"name": "http-health", "containerPort": 9100, "protocol": "TCP"}]
    assert env_value(manifests, "RELAY_WORKER_HTTP_PORT") == "9100"


@pytest.mark.parametrize("variant", VARIANTS)
def test_drain_times_fit_the_grace_periods(chart: helm.Chart, variant: str) -> None:
    manifests = render(chart, VARIANTS[variant]())
    api = find(manifests, "Deployment", f"{FULLNAME}-api")
    pre_stop = container(api)["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = int(env_value(manifests, "RELAY_SHUTDOWN_TIMEOUT"))
    assert pre_stop >= 5, "endpoint removal needs a few seconds to reach every proxy"
    assert pod_spec(api)["terminationGracePeriodSeconds"] >= pre_stop + drain + 5
    worker = find(manifests, "Deployment", f"{FULLNAME}-worker")
    # The worker lets work finish for RELAY_SHUTDOWN_TIMEOUT, then hands the rest back: about
    # 30 s in all with the default 20.
    assert pod_spec(worker)["terminationGracePeriodSeconds"] >= max(30, drain + 10) + 5


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"api": {"terminationGracePeriodSeconds": 30}}, "api.terminationGracePeriodSeconds"),
        ({"config": {"shutdownTimeout": 60}}, "api.terminationGracePeriodSeconds"),
        (
            {"config": {"shutdownTimeout": 35}, "api": {"terminationGracePeriodSeconds": 60}},
            "worker.terminationGracePeriodSeconds",
        ),
        ({"worker": {"terminationGracePeriodSeconds": 30}}, "worker.terminationGracePeriodSeconds"),
        ({"redis": {"url": "redis://r:6379/0", "standalone": {"enabled": True}}}, "only one of"),
        (
            {"secrets": {"apiKeys": ["key-one"]}, "callers": {"existingSecret": "relay-callers"}},
            "set callers.existingSecret or secrets.apiKeys, not both",
        ),
        ({"api": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}}, "minReplicas"),
    ],
)
def test_inconsistent_values_fail_the_render(
    chart: helm.Chart, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(chart, values)


@pytest.mark.parametrize("variant", VARIANTS)
def test_pods_meet_the_restricted_pod_security_standard(chart: helm.Chart, variant: str) -> None:
    manifests = render(chart, VARIANTS[variant]())
    for workload in workloads(manifests):
        spec = pod_spec(workload)
        where = kn(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        assert "hostNetwork" not in spec and "hostPID" not in spec, where
        tmp_volumes = {
            v["name"] for v in spec["volumes"] if "emptyDir" in v and v["emptyDir"]["sizeLimit"]
        }
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 10000, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert len(tmp) == 1 and tmp[0]["name"] in tmp_volumes, where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= c["resources"][kind].keys(), where


def test_config_and_secret_changes_roll_the_pods(chart: helm.Chart) -> None:
    def checksums(values: dict[str, Any]) -> dict[str, str]:
        manifests = render(chart, values)
        annotations = [
            find(manifests, "Deployment", f"{FULLNAME}-{c}")["spec"]["template"]["metadata"][
                "annotations"
            ]
            for c in ("api", "worker")
        ]
        assert annotations[0] == annotations[1]
        return {k: v for k, v in annotations[0].items() if k.startswith("checksum/")}

    base = checksums(copy.deepcopy(SMALL_INSTALL) | {"redis": {"url": "redis://r:6379/0"}})
    assert base.keys() == {"checksum/config", "checksum/secret"}
    assert base == checksums(copy.deepcopy(SMALL_INSTALL) | {"redis": {"url": "redis://r:6379/0"}})
    config_changed = checksums(
        copy.deepcopy(SMALL_INSTALL)
        | {"redis": {"url": "redis://r:6379/0"}, "config": {"pollMaxInterval": 30}}
    )
    assert config_changed["checksum/config"] != base["checksum/config"]
    assert config_changed["checksum/secret"] == base["checksum/secret"]
    secret_changed = checksums(
        copy.deepcopy(SMALL_INSTALL) | {"redis": {"url": "redis://:pw@r:6379/0"}}
    )
    assert secret_changed["checksum/secret"] != base["checksum/secret"]
    assert secret_changed["checksum/config"] == base["checksum/config"]


CONTRACT_ENV = {
    "CHAMELAION_BASE_URL", "CHAMELAION_API_KEY", "RELAY_REDIS_URL", "RELAY_API_KEYS",
    "RELAY_WEBHOOK_SECRETS", "RELAY_POLL_MIN_INTERVAL", "RELAY_POLL_MAX_INTERVAL",
    "RELAY_DELIVERY_RETRY_SCHEDULE", "RELAY_UPSTREAM_RATE_LIMIT", "RELAY_WORKER_CONCURRENCY",
    "RELAY_CALLBACK_ALLOWED_NETWORKS", "RELAY_CALLBACK_DENIED_NETWORKS", "RELAY_MAX_BODY_BYTES",
    "RELAY_MAX_UPLOAD_BYTES", "RELAY_LOG_FORMAT", "RELAY_LOG_LEVEL", "RELAY_SHUTDOWN_TIMEOUT",
    "RELAY_WORKER_HTTP_PORT", "RELAY_DELIVERY_CONCURRENCY", "RELAY_DESTINATION_CONCURRENCY",
    "RELAY_DESTINATION_FAILURES", "RELAY_DESTINATION_MAX_BACKOFF", "RELAY_SWEEP_INTERVAL",
    "RELAY_SWEEP_PAGE_SIZE", "RELAY_SWEEP_WINDOW", "RELAY_SWEEP_CONCURRENCY",
    "RELAY_STATUS_READ_SHARE", "RELAY_CALLER_MAX_OUTSTANDING", "RELAY_CALLER_SUBMIT_RATE",
    "RELAY_REDIS_TIMEOUT", "RELAY_REDIS_WAIT_REPLICAS",
    "RELAY_REDIS_WAIT_TIMEOUT", "RELAY_MAX_UPSTREAM_PAUSE",
    "RELAY_CALLBACK_ALLOWED_PORTS", "RELAY_METRICS_AUTH",
    "RELAY_OPS_WEBHOOK_URL", "RELAY_OPS_WEBHOOK_SECRET",
    "RELAY_MAX_UPLOADS", "RELAY_MAX_UPLOADS_PER_KEY", "RELAY_UPLOAD_MIN_RATE",
    "RELAY_HTTP_HEADER_TIMEOUT", "RELAY_HTTP_KEEPALIVE_TIMEOUT", "RELAY_HTTP_BODY_TIMEOUT",
    "RELAY_HTTP_MAX_CONCURRENCY", "RELAY_HTTP_MAX_CONNECTIONS",
    "RELAY_HTTP_MAX_CONNECTIONS_PER_PEER", "RELAY_API_PORT", "RELAY_FORWARDED_ALLOW_IPS",
    "RELAY_MAX_WAIT", "RELAY_EVENTS_KEEPALIVE",
    "RELAY_CONSOLE_SECURE_COOKIES", "RELAY_IDEMPOTENCY_MAX_KEYS", "RELAY_TEST_EVENTS_PER_MINUTE",
    "RELAY_ATTEMPT_LOG_EXCERPT", "RELAY_REDELIVERIES_PER_MINUTE", "RELAY_RECOVERS_PER_MINUTE",
}  # fmt: skip
SECRET_ENV = {"CHAMELAION_API_KEY", "RELAY_API_KEYS", "RELAY_WEBHOOK_SECRETS", "RELAY_REDIS_URL"}


def test_configmap_carries_the_non_secret_settings(chart: helm.Chart) -> None:
    manifests = render(
        chart,
        {
            "config": {
                "maxUploadBytes": 104857600,
                "deliveryRetrySchedule": "5,30,120",
                "callbackDeniedNetworks": "10.0.0.0/8,fd00::/8",
                "pollMinInterval": 0.5,
                "sweepPageSize": 500,
                "statusReadShare": 0.3,
                "callerMaxOutstanding": 20000,
                "callerSubmitRate": 50,
                "redisWaitReplicas": 1,
                "redisTimeout": 3,
                "httpMaxConnectionsPerPeer": 2048,
                "testEventsPerMinute": 3,
                "recoversPerMinute": 2,
                "attemptLogExcerpt": False,
            }
        },
    )
    data: dict[str, str] = find(manifests, "ConfigMap", FULLNAME)["data"]
    assert data["RELAY_REDIS_WAIT_REPLICAS"] == "1"
    assert data["RELAY_REDIS_TIMEOUT"] == "3"
    assert data["RELAY_HTTP_MAX_CONNECTIONS_PER_PEER"] == "2048"
    assert "RELAY_HTTP_MAX_CONNECTIONS" not in data
    assert "RELAY_MAX_UPSTREAM_PAUSE" not in data
    assert data.keys() <= CONTRACT_ENV - SECRET_ENV
    assert data["RELAY_LOG_FORMAT"] == "json"
    # Large integers stay integers (Helm hands numbers to templates as float64).
    assert data["RELAY_MAX_UPLOAD_BYTES"] == "104857600"
    assert data["RELAY_POLL_MIN_INTERVAL"] == "0.5"
    assert data["RELAY_POLL_MAX_INTERVAL"] == "60"
    assert data["RELAY_DELIVERY_RETRY_SCHEDULE"] == "5,30,120"
    denied = data["RELAY_CALLBACK_DENIED_NETWORKS"].split(",")
    assert denied[:2] == ["10.0.0.0/8", "fd00::/8"]
    assert "10.96.0.1/32" in denied  # the cluster's API server, by default
    assert data["RELAY_SWEEP_PAGE_SIZE"] == "500"
    assert data["RELAY_STATUS_READ_SHARE"] == "0.3"
    assert data["RELAY_CALLER_MAX_OUTSTANDING"] == "20000"
    assert data["RELAY_CALLER_SUBMIT_RATE"] == "50"
    assert data["RELAY_TEST_EVENTS_PER_MINUTE"] == "3"
    assert data["RELAY_RECOVERS_PER_MINUTE"] == "2"
    assert "RELAY_REDELIVERIES_PER_MINUTE" not in data
    assert data["RELAY_ATTEMPT_LOG_EXCERPT"] == "false"
    assert "RELAY_IDEMPOTENCY_MAX_KEYS" not in data
    assert "RELAY_SWEEP_INTERVAL" not in data
    # Unset values are left out so that the application's own defaults apply.
    assert "RELAY_MAX_BODY_BYTES" not in data
    assert data["RELAY_CALLBACK_ALLOWED_NETWORKS"] == RECEIVERS


def test_the_default_config_closes_the_clusters_control_plane(chart: helm.Chart) -> None:
    # Finding 2: the chart shipped an empty denied list; now its defaults close the API
    # server's ClusterIP of the common distributions, the values add node ranges, and ports
    # outside the web ports (kubelets, the relay's own) are refused.
    data = find(render(chart), "ConfigMap", FULLNAME)["data"]
    denied = data["RELAY_CALLBACK_DENIED_NETWORKS"].split(",")
    assert {"10.96.0.1/32", "10.100.0.1/32", "172.20.0.1/32", "10.43.0.1/32"} <= set(denied)
    assert data["RELAY_CALLBACK_ALLOWED_PORTS"] == "80,443,8080,8443"
    assert data["RELAY_METRICS_AUTH"] == "false"
    with_nodes = render(chart, {"config": {"clusterNetworks": {"nodes": ["10.0.0.0/20"]}}})
    data = find(with_nodes, "ConfigMap", FULLNAME)["data"]
    assert "10.0.0.0/20" in data["RELAY_CALLBACK_DENIED_NETWORKS"].split(",")
    # What the chart renders is what the relay accepts, and its policy refuses those targets.
    settings = load_settings(CHAMELAION_API_KEY="x", **data)
    policy = callback_policy(settings)
    assert policy.check_address(ip_address("10.96.0.1")) is not None
    assert policy.check_address(ip_address("10.0.3.4")) is not None
    assert policy.check_port(10250) is not None
    assert policy.check_port(8000) is not None
    assert policy.check_port(443) is None


def test_the_receivers_networks_must_be_asked_for(chart: helm.Chart) -> None:
    # Issue #24, finding 2: with the chart's defaults only the API server's address was
    # refused, so any caller key could point a test event at every Service and Pod.
    with pytest.raises(helm.HelmRenderError, match=re.escape("config.callbackAllowedNetworks")):
        render_raw(chart, {}, receivers=False)
    with pytest.raises(helm.HelmRenderError, match="not both"):
        render(chart, {"config": {"callbackAllowedNetworks": RECEIVERS,
                                  "callbackAllowAnyNetwork": True}})  # fmt: skip
    data = find(render(chart), "ConfigMap", FULLNAME)["data"]
    assert data["RELAY_CALLBACK_ALLOWED_NETWORKS"] == RECEIVERS
    policy = callback_policy(load_settings(CHAMELAION_API_KEY="x", **data))
    assert policy.check_address(ip_address("10.20.70.5")) is None  # a receiver
    for elsewhere in ("10.96.12.34", "10.244.1.7", "172.20.5.5", "192.168.1.10"):
        assert policy.check_address(ip_address(elsewhere)) is not None, elsewhere
    # The broad default only when asked for by name.
    broad = render(chart, {"config": {"callbackAllowAnyNetwork": True}})
    data = find(broad, "ConfigMap", FULLNAME)["data"]
    assert "RELAY_CALLBACK_ALLOWED_NETWORKS" not in data
    policy = callback_policy(load_settings(CHAMELAION_API_KEY="x", **data))
    assert policy.check_address(ip_address("10.244.1.7")) is None
    assert policy.check_address(ip_address("10.96.0.1")) is not None  # the API server still


def relay_env(manifest: Manifest) -> dict[str, Any]:
    return {e["name"]: e for e in container(manifest).get("env", [])}


def test_tracing_and_operational_events_reach_both_processes(chart: helm.Chart) -> None:
    ops_secret = "whsec_" + base64.b64encode(b"o" * 32).decode()
    manifests = render(
        chart,
        {
            "tracing": {
                "endpoint": "http://otel-collector.observability:4318",
                "sampler": "parentbased_traceidratio",
                "samplerArg": "0.25",
                "env": {"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod"},
            },
            "config": {"opsWebhookUrl": "https://ops.example.com/relay"},
            "secrets": {**SMALL_INSTALL["secrets"], "opsWebhookSecret": ops_secret},
        },
    )
    data: dict[str, str] = find(manifests, "ConfigMap", FULLNAME)["data"]
    assert data["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4318"
    assert data["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
    assert data["OTEL_TRACES_SAMPLER_ARG"] == "0.25"
    assert data["OTEL_RESOURCE_ATTRIBUTES"] == "deployment.environment=prod"
    assert "OTEL_SERVICE_NAME" not in data  # unset: the relay's own default
    assert data["RELAY_OPS_WEBHOOK_URL"] == "https://ops.example.com/relay"
    secret = find(manifests, "Secret", FULLNAME)["data"]
    assert base64.b64decode(secret["RELAY_OPS_WEBHOOK_SECRET"]).decode() == ops_secret
    # Off by default: no OTEL_* at all.
    default = find(render(chart, {}), "ConfigMap", FULLNAME)["data"]
    assert not [name for name in default if name.startswith("OTEL_")]
    assert "RELAY_OPS_WEBHOOK_URL" not in default


def test_credentials_come_from_a_secret(chart: helm.Chart) -> None:
    manifests = render(chart, {**copy.deepcopy(SMALL_INSTALL), "redis": {"url": "redis://r/0"}})
    secret = find(manifests, "Secret", FULLNAME)
    assert secret["data"].keys() == SECRET_ENV
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded["RELAY_API_KEYS"] == "key-one,key-two"
    assert decoded["RELAY_REDIS_URL"] == "redis://r/0"
    for component in ("api", "worker"):
        deployment = find(manifests, "Deployment", f"{FULLNAME}-{component}")
        assert container(deployment)["envFrom"] == [
            {"configMapRef": {"name": FULLNAME}},
            {"secretRef": {"name": FULLNAME}},
        ]
        assert relay_env(deployment)["RELAY_REDIS_URL"]["valueFrom"] == {
            "secretKeyRef": {"name": FULLNAME, "key": "RELAY_REDIS_URL"}
        }
    # Nothing secret leaks into the ConfigMap.
    assert not set(find(manifests, "ConfigMap", FULLNAME)["data"]) & SECRET_ENV


def test_existing_secrets_replace_the_charts(chart: helm.Chart) -> None:
    manifests = render(chart, production_values())
    assert of_kind(manifests, "Secret") == []
    api = find(manifests, "Deployment", f"{FULLNAME}-api")
    assert {"secretRef": {"name": "chamelaion-relay-credentials"}} in container(api)["envFrom"]
    assert relay_env(api)["RELAY_REDIS_URL"]["valueFrom"] == {
        "secretKeyRef": {"name": "chamelaion-relay-redis", "key": "url"}
    }
    assert "WARNING" not in notes(chart, production_values())


def test_the_callers_file_is_mounted_from_its_secret(chart: helm.Chart) -> None:
    values = copy.deepcopy(SMALL_INSTALL)
    values["secrets"]["apiKeys"] = []
    values["callers"] = {"existingSecret": "relay-callers", "key": "teams.json"}
    manifests = render(chart, values)
    assert configmap_data(chart, values)["RELAY_CALLERS_FILE"] == "/etc/relay/callers/teams.json"
    for component in ("api", "worker"):
        deployment = find(manifests, "Deployment", f"{FULLNAME}-{component}")
        [volume] = [v for v in pod_spec(deployment)["volumes"] if v["name"] == "callers"]
        assert volume["secret"] == {
            "secretName": "relay-callers",
            "items": [{"key": "teams.json", "path": "teams.json"}],
        }
        [mount] = [m for m in container(deployment)["volumeMounts"] if m["name"] == "callers"]
        # A directory, never a subPath: Kubernetes updates only whole mounted Secrets, and the
        # relay re-reads the changed file without a restart.
        assert mount == {"name": "callers", "mountPath": "/etc/relay/callers", "readOnly": True}
    assert "RELAY_API_KEYS" not in find(manifests, "Secret", FULLNAME)["data"]
    assert "secrets.apiKeys" not in notes(chart, values)
    # Without it, nothing is mounted and the variable is not set.
    plain = render(chart, copy.deepcopy(SMALL_INSTALL))
    api = find(plain, "Deployment", f"{FULLNAME}-api")
    assert all(v["name"] != "callers" for v in pod_spec(api)["volumes"])
    assert "RELAY_CALLERS_FILE" not in configmap_data(chart, copy.deepcopy(SMALL_INSTALL))


def test_missing_configuration_is_reported_not_fatal(chart: helm.Chart) -> None:
    """Defaults render (helm lint and template need that) and NOTES.txt says what is missing."""
    manifests = render(chart)
    assert "RELAY_REDIS_URL" not in relay_env(find(manifests, "Deployment", f"{FULLNAME}-api"))
    text = notes(chart)
    assert "secrets.chamelaionApiKey" in text
    assert "no Redis is configured" in text
    assert "Redis Cluster is not supported" in text


def test_standalone_redis(chart: helm.Chart) -> None:
    manifests = render(chart, copy.deepcopy(SMALL_INSTALL))
    name = f"{FULLNAME}-redis"
    statefulset = find(manifests, "StatefulSet", name)
    redis = container(statefulset)
    assert redis["image"] == "docker.io/library/redis:7.4"
    args = redis["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert args[args.index("--hash-max-listpack-value") + 1] == "1024"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert {"name": "data", "mountPath": "/data"} in redis["volumeMounts"]
    assert find(manifests, "Service", name)["spec"]["ports"][0]["port"] == 6379
    assert len(find(manifests, "Secret", name)["data"]["redis-password"]) > 0
    # The relay builds its URL from the same Secret; Kubernetes expands $(REDIS_PASSWORD)
    # only from variables defined before it.
    env = container(find(manifests, "Deployment", f"{FULLNAME}-worker"))["env"]
    names = [e["name"] for e in env]
    assert names.index("REDIS_PASSWORD") < names.index("RELAY_REDIS_URL")
    assert env[names.index("RELAY_REDIS_URL")]["value"] == (
        f"redis://:$(REDIS_PASSWORD)@{name}:6379/0"
    )
    # Only the release's own pods may connect.
    policy = find(manifests, "NetworkPolicy", name)
    assert policy["spec"]["egress"] == []


def test_autoscaling(chart: helm.Chart) -> None:
    manifests = render(chart, production_values())
    api = find(manifests, "Deployment", f"{FULLNAME}-api")
    worker = find(manifests, "Deployment", f"{FULLNAME}-worker")
    # The autoscalers own the replica counts.
    assert "replicas" not in api["spec"] and "replicas" not in worker["spec"]
    hpa = find(manifests, "HorizontalPodAutoscaler", f"{FULLNAME}-api")
    assert hpa["spec"]["scaleTargetRef"]["name"] == api["metadata"]["name"]
    scaled = find(manifests, "ScaledObject", f"{FULLNAME}-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    # Due work only (not parked future polls), and max(): every API pod reports the same gauge.
    assert query == f'max(relay_due_work{{namespace="{NAMESPACE}",service="{FULLNAME}"}})'
    assert trigger["metadata"]["serverAddress"] == "http://prometheus-operated.monitoring.svc:9090"
    assert [h["kind"] for h in of_kind(manifests, "HorizontalPodAutoscaler")] == [
        "HorizontalPodAutoscaler"
    ]  # KEDA makes the worker's HPA itself.
    # KEDA is off by default: the worker then has a fixed replica count.
    default = render(chart)
    assert of_kind(default, "ScaledObject") == []
    assert find(default, "Deployment", f"{FULLNAME}-worker")["spec"]["replicas"] == 2


@pytest.mark.parametrize("variant", VARIANTS)
def test_disruption_budgets(chart: helm.Chart, variant: str) -> None:
    manifests = render(chart, VARIANTS[variant]())
    for component in ("api", "worker"):
        pdb = find(manifests, "PodDisruptionBudget", f"{FULLNAME}-{component}")
        deployment = find(manifests, "Deployment", f"{FULLNAME}-{component}")
        assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
        # maxUnavailable never blocks a node drain, whatever the replica count.
        assert pdb["spec"]["maxUnavailable"] == 1


def test_network_policies(chart: helm.Chart) -> None:
    assert of_kind(render(chart), "NetworkPolicy") == []
    manifests = render(chart, production_values())
    policies = {m["metadata"]["name"]: m for m in of_kind(manifests, "NetworkPolicy")}
    assert set(policies) == {f"{FULLNAME}-api", f"{FULLNAME}-worker", f"{FULLNAME}-test"}
    for component in ("api", "worker"):
        spec = policies[f"{FULLNAME}-{component}"]["spec"]
        assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == component
        egress = spec["egress"]
        blocks = {
            p["ipBlock"]["cidr"]: p["ipBlock"] for r in egress for p in r["to"] if "ipBlock" in p
        }
        # Callbacks can never reach cloud metadata endpoints or cluster-internal addresses,
        # over IPv4 or IPv6 (nor through IPv4-mapped IPv6 addresses).
        assert {"169.254.0.0/16", "10.0.0.0/8"} <= set(blocks["0.0.0.0/0"]["except"])
        assert {"fc00::/7", "fe80::/10", "::ffff:0:0/96"} <= set(blocks["::/0"]["except"])
        assert {"ipBlock": {"cidr": "10.20.30.0/24"}} in [p for r in egress for p in r["to"]]


def test_service_monitors(chart: helm.Chart) -> None:
    manifests = render(chart, production_values())
    monitors = of_kind(manifests, "ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {f"{FULLNAME}-api", f"{FULLNAME}-worker"}
    for monitor in monitors:
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        selector = monitor["spec"]["selector"]["matchLabels"]
        (service,) = [
            s
            for s in of_kind(manifests, "Service")
            if selector.items() <= s["metadata"]["labels"].items()
        ]
        ports = {p["name"] for p in service["spec"]["ports"]}
        assert monitor["spec"]["endpoints"][0]["port"] in ports
        assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_helm_test_pod(chart: helm.Chart) -> None:
    manifests = render(chart)
    pod = find(manifests, "Pod", f"{FULLNAME}-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = container(pod)["command"][-1]
    assert f"http://{FULLNAME}:80/readyz" in script
    compile(script, "helm-test", "exec")


# --- checkov ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkov_report(chart: helm.Chart, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One checkov run over all three renders (it takes a few seconds per start)."""
    out = tmp_path_factory.mktemp("rendered")
    for variant, values in VARIANTS.items():
        docs = render(chart, values())
        (out / f"{variant}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    result = subprocess.run(
        [uv(), "tool", "run", *CHECKOV, "--directory", str(out), "--framework", "kubernetes",
         "--output", "json", "--compact", "--skip-download"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    # checkov exits 1 when a check fails; the report says which.
    assert result.returncode in (0, 1), result.stderr[-3000:]
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["resource_count"] > 0
    return report


def test_checkov_finds_nothing(checkov_report: dict[str, Any]) -> None:
    failed = [
        f"{f['check_id']} {f['check_name']}: {f['file_path']} {f['resource']}"
        for f in checkov_report["results"]["failed_checks"]
    ]
    assert failed == []


def test_checkov_exemptions_are_justified_and_documented(checkov_report: dict[str, Any]) -> None:
    skipped = checkov_report["results"]["skipped_checks"]
    assert skipped, "the chart's documented exemptions should show up as skips"
    documented = DOCS.read_text(encoding="utf-8")
    for skip in skipped:
        reason = skip["check_result"].get("suppress_comment", "")
        assert len(reason) > 30 and reason != "No comment provided", skip["check_id"]
        assert skip["check_id"] in documented, f"{skip['check_id']} missing from {DOCS.name}"
    # Images pinned by digest need no exemption: the production render has none for them.
    production = {s["check_id"] for s in skipped if s["file_path"].endswith("production.yaml")}
    assert production.isdisjoint({"CKV_K8S_43", "CKV_K8S_15", "CKV2_K8S_6"})


def test_console_ingress_is_off_by_default_and_publishes_only_the_console(
    chart: helm.Chart,
) -> None:
    assert of_kind(render(chart), "Ingress") == []
    values = {
        "console": {
            "ingress": {
                "enabled": True,
                "className": "nginx",
                "host": "relay-console.example.com",
                "tls": [{"secretName": "console-tls", "hosts": ["relay-console.example.com"]}],
            }
        }
    }
    (ingress,) = of_kind(render(chart, values), "Ingress")
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "relay-console.example.com"
    assert [p["path"] for p in rule["http"]["paths"]] == ["/console"]
    assert rule["http"]["paths"][0]["backend"]["service"]["name"] == FULLNAME
    assert ingress["spec"]["tls"][0]["secretName"] == "console-tls"


def configmap_data(chart: helm.Chart, values: dict[str, Any] | None = None) -> dict[str, str]:
    data: dict[str, str] = find(render(chart, values), "ConfigMap", FULLNAME)["data"]
    return data


def test_behind_the_console_ingress_with_tls_the_cookies_are_secure(chart: helm.Chart) -> None:
    # Finding 6 of #24: behind the chart's TLS Ingress the API saw plain http from an address
    # it does not trust, and set the session cookie without Secure.
    ingress = {"enabled": True, "host": "relay-console.example.com"}
    with_tls = {"console": {"ingress": {**ingress, "tls": [{"secretName": "console-tls"}]}}}
    assert configmap_data(chart, with_tls)["RELAY_CONSOLE_SECURE_COOKIES"] == "true"
    assert configmap_data(chart, {"console": {"ingress": ingress}}).get(
        "RELAY_CONSOLE_SECURE_COOKIES"
    ) in (None, "false")
    assert configmap_data(chart).get("RELAY_CONSOLE_SECURE_COOKIES") in (None, "false")
    # Said outright, either way, it wins.
    forced_off = {"console": {**with_tls["console"], "secureCookies": False}}
    assert configmap_data(chart, forced_off)["RELAY_CONSOLE_SECURE_COOKIES"] == "false"
    forced_on = {"console": {"secureCookies": True}}
    assert configmap_data(chart, forced_on)["RELAY_CONSOLE_SECURE_COOKIES"] == "true"


def test_trusted_proxies_reach_the_api(chart: helm.Chart) -> None:
    assert "RELAY_FORWARDED_ALLOW_IPS" not in configmap_data(chart)
    values = {"config": {"forwardedAllowIps": "10.244.0.0/16"}}
    assert configmap_data(chart, values)["RELAY_FORWARDED_ALLOW_IPS"] == "10.244.0.0/16"
