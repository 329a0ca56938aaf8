"""The chart's Grafana dashboard: a ConfigMap for Grafana's sidecar, off by default.

The JSON is checked as Grafana reads it (a dashboard with unique panel ids, panels that do not
overlap, every query on the dashboard's data source variable), and every query is parsed as
PromQL and checked against the /metrics of a running relay. Every query selects its series
with the same matcher, so a variable (the `caller`) is added in one place.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml
from redis import Redis

from tests.chart_values import with_receivers
from tests.metric_check import Exported, exported, selectors, unknown

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "chamelaion-relay"
DASHBOARD = CHART / "files" / "dashboard.json"
TEMPLATE = "chamelaion-relay/templates/grafana-dashboard.yaml"
# A series without a `caller` label matches `$caller|` whichever callers are chosen.
MATCHER = 'namespace="$namespace",service=~"$release(-worker-metrics)?",caller=~"$caller|"'
# Grafana's own interval variables, given a value PromQL can parse.
GRAFANA_INTERVALS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any]) -> dict[str, str]:
    return chart.render(with_receivers(values), name="relay", namespace="relay", is_install=True)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found += panel.get("panels", [])
    return found


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query, Grafana's interval variables filled in."""
    found = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_INTERVALS.items():
                expr = expr.replace(variable, value)
            found.append((panel["title"], expr))
    return found


def test_the_configmap_is_off_by_default_and_carries_the_dashboard_for_the_sidecar(
    chart: helm.Chart,
) -> None:
    assert not render(chart, {}).get(TEMPLATE, "").strip()
    values = {
        "metrics": {
            "grafanaDashboard": {
                "enabled": True,
                "annotations": {"grafana_folder": "Relay"},
                "namespace": "monitoring",
            }
        }
    }
    configmap = yaml.safe_load(render(chart, values)[TEMPLATE])
    assert configmap["kind"] == "ConfigMap"
    assert configmap["metadata"]["namespace"] == "monitoring"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Relay"}
    assert json.loads(configmap["data"]["chamelaion-relay.json"]) == json.loads(
        DASHBOARD.read_text()
    )


def test_the_dashboard_is_one_grafana_reads(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "chamelaion-relay" and dashboard["title"]
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids))
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert {"namespace", "release", "caller"} <= variables.keys()
    cells: set[tuple[int, int]] = set()
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["description"], panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"] == panel["datasource"]


def test_every_query_selects_the_release_with_the_one_matcher(dashboard: dict[str, Any]) -> None:
    for title, expr in queries(dashboard):
        for selector in selectors(expr):
            matchers = {m.name: m.value for m in selector.matchers.matchers}
            assert matchers.get("namespace") == "$namespace", (title, expr)
            assert matchers.get("service") == "$release(-worker-metrics)?", (title, expr)
            assert matchers.get("caller") == "$caller|", (title, expr)
        assert MATCHER in expr, (title, expr)


@pytest.fixture(scope="module")
def relay_exports(redis_server_url: str) -> Exported:
    Redis.from_url(redis_server_url).flushall()
    return exported(redis_server_url)


def test_every_query_names_metrics_and_label_values_the_relay_exports(
    dashboard: dict[str, Any], relay_exports: Exported
) -> None:
    problems = {
        f"{title}: {expr}": found
        for title, expr in queries(dashboard)
        if (found := unknown(expr, relay_exports))
    }
    assert problems == {}
    # The check reads every panel: the dashboard covers what the issue asks for.
    named = {selector.name for _, expr in queries(dashboard) for selector in selectors(expr)}
    assert {
        "relay_jobs_submitted_total",
        "relay_jobs_ended_total",
        "relay_delivery_latency_seconds_bucket",
        "relay_deliveries_total",
        "relay_upstream_calls_total",
        "relay_upstream_rate_limit",
        "relay_sweep_pages_total",
        "relay_redis_memory_used_bytes",
    } <= named
