"""The chart's alerts (PrometheusRule), checked with Prometheus's own promtool.

The rules are rendered by Helm's engine for release `relay` in namespace `relay`. `promtool
check rules` parses and lints them; `promtool test rules` replays tests/alerts_test.yaml, which
says for each alert when it fires and what it stays quiet on. Every metric and label value an
expression matches on is checked against the /metrics of a running relay, and every alert's
runbook_url against the sections of docs/operations.md.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml
from redis import Redis

from tests.chart_values import with_receivers
from tests.metric_check import Exported, exported, unknown

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "chamelaion-relay"
UNIT_TESTS = Path(__file__).with_name("alerts_test.yaml")
OPERATIONS = ROOT / "docs" / "operations.md"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
RUNBOOKS = "https://git.example.com/platform/chamelaion-relay/blob/main/docs/operations.md"
ENABLED = {"metrics": {"prometheusRule": {"enabled": True, "runbookUrl": RUNBOOKS}}}
TEMPLATE = "chamelaion-relay/templates/prometheusrule.yaml"

needs_promtool = pytest.mark.skipif(
    not Path(PROMTOOL).exists(), reason="needs Debian's promtool (apt-get install prometheus)"
)

Rule = dict[str, Any]


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any]) -> dict[str, str]:
    return chart.render(with_receivers(values), name="relay", namespace="relay", is_install=True)


def rule_groups(chart: helm.Chart, values: dict[str, Any] = ENABLED) -> list[dict[str, Any]]:
    manifest = yaml.safe_load(render(chart, copy.deepcopy(values))[TEMPLATE])
    assert manifest["kind"] == "PrometheusRule"
    groups: list[dict[str, Any]] = manifest["spec"]["groups"]
    return groups


def rules(chart: helm.Chart, values: dict[str, Any] = ENABLED) -> list[Rule]:
    return [rule for group in rule_groups(chart, values) for rule in group["rules"]]


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def write_rules(directory: Path, groups: list[dict[str, Any]], *, annotations: bool) -> str:
    if not annotations:
        groups = copy.deepcopy(groups)
        for group in groups:
            for rule in group["rules"]:
                rule.pop("annotations", None)
    (directory / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return "rules.yaml"


# --- promtool ---------------------------------------------------------------------------------


@needs_promtool
def test_promtool_accepts_the_rules(chart: helm.Chart, tmp_path: Path) -> None:
    name = write_rules(tmp_path, rule_groups(chart), annotations=True)
    result = promtool("check", "rules", name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules(chart))} rules found" in result.stdout


@needs_promtool
def test_each_alert_fires_when_its_runbook_says_and_not_otherwise(
    chart: helm.Chart, tmp_path: Path
) -> None:
    tests = yaml.safe_load(UNIT_TESTS.read_text())
    tests["rule_files"] = [write_rules(tmp_path, rule_groups(chart), annotations=False)]
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_fails_a_rule_that_does_not_fire_as_tested(
    chart: helm.Chart, tmp_path: Path
) -> None:
    """The unit tests can fail: with a threshold raised past the test's series, they do."""
    values = copy.deepcopy(ENABLED)
    values["metrics"]["prometheusRule"]["thresholds"] = {"callbacksLateSeconds": 100}
    tests = yaml.safe_load(UNIT_TESTS.read_text())
    tests["rule_files"] = [write_rules(tmp_path, rule_groups(chart, values), annotations=False)]
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert "alertname: RelayCallbacksLate" in result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_quiet(chart: helm.Chart) -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(UNIT_TESTS.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in rules(chart)}
    assert names - firing == set()
    assert names - quiet == set()


@needs_promtool
def test_annotations_say_what_happened_and_link_the_runbook(
    chart: helm.Chart, tmp_path: Path
) -> None:
    """One alert with its annotations as Alertmanager gets them: $value rendered, the release
    named, the runbook linked."""
    case = {
        "rule_files": [write_rules(tmp_path, rule_groups(chart), annotations=True)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": 'relay_delivery_lag_seconds{namespace="relay",'
                        'service="relay-chamelaion-relay",pod="api-0"}',
                        "values": "90x10",
                    }
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "6m",
                        "alertname": "RelayCallbacksLate",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "critical", "namespace": "relay"},
                                "exp_annotations": {
                                    "summary": "Callbacks that are due are not being sent",
                                    "description": (
                                        "The most overdue callback attempt of chamelaion-relay "
                                        "release relay (namespace relay) is 1m 30s late. "
                                        "Attempts waiting on their retry schedule or on a "
                                        "backed-off receiver are not counted: this is the "
                                        "relay falling behind."
                                    ),
                                    "runbook_url": RUNBOOKS + "#relaycallbackslate",
                                },
                            }
                        ],
                    }
                ],
            }
        ],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(case, sort_keys=False))
    result = promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# --- What the rules name ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def relay_exports(redis_server_url: str) -> Exported:
    Redis.from_url(redis_server_url).flushall()
    return exported(redis_server_url)


def test_every_metric_and_label_value_in_the_rules_is_exported(
    chart: helm.Chart, relay_exports: Exported
) -> None:
    problems = {rule["alert"]: unknown(rule["expr"], relay_exports) for rule in rules(chart)}
    assert {alert: found for alert, found in problems.items() if found} == {}


def test_the_check_finds_what_the_relay_does_not_export(relay_exports: Exported) -> None:
    assert unknown("max(relay_delivery_lag_second)", relay_exports) == [
        "metric 'relay_delivery_lag_second'"
    ]
    assert unknown('sum(rate(relay_deliveries_total{outcome="fail"}[5m]))', relay_exports) == [
        "relay_deliveries_total{outcome='fail'}"
    ]
    assert unknown('relay_sweeps_total{outcome=~"complete|stoped"}', relay_exports) == [
        "relay_sweeps_total{outcome='stoped'}"
    ]
    assert unknown('relay_outstanding_jobs{namespace="x",pod="y"}', relay_exports) == []


def test_every_alert_links_its_own_runbook_section(chart: helm.Chart) -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    runbooks = text.split("\n## Runbooks\n", 1)[1].split("\n## ", 1)[0]
    sections = {heading.lower(): heading for heading in re.findall(r"^### (\S+)$", runbooks, re.M)}
    for rule in rules(chart):
        anchor = rule["annotations"]["runbook_url"].removeprefix(RUNBOOKS + "#")
        assert sections.get(anchor) == rule["alert"], f"no runbook section for {rule['alert']}"
    assert set(sections.values()) == {rule["alert"] for rule in rules(chart)}


# --- Values -----------------------------------------------------------------------------------


def test_the_rule_is_off_by_default_and_needs_its_runbook_url(chart: helm.Chart) -> None:
    assert TEMPLATE not in {k for k, v in render(chart, {}).items() if v.strip()}
    with pytest.raises(helm.HelmRenderError, match="runbookUrl"):
        render(chart, {"metrics": {"prometheusRule": {"enabled": True}}})


def test_selector_thresholds_labels_and_left_out_alerts_come_from_values(
    chart: helm.Chart,
) -> None:
    default = {rule["alert"]: rule for rule in rules(chart)}
    services = "relay-chamelaion-relay|relay-chamelaion-relay-worker-metrics"
    selector = f'namespace="relay",service=~"{services}"'
    for rule in default.values():
        assert selector in rule["expr"], rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning")
    values = copy.deepcopy(ENABLED)
    values["metrics"]["prometheusRule"].update(
        selector='job="relay"',
        thresholds={"callbacksLateSeconds": 300, "backedOffFor": "2h"},
        alertLabels={"team": "platform"},
        disabled=["RelayPollsLate"],
        labels={"release": "kube-prometheus-stack"},
    )
    changed = {rule["alert"]: rule for rule in rules(chart, values)}
    assert set(default) - set(changed) == {"RelayPollsLate"}
    assert changed["RelayCallbacksLate"]["expr"].endswith("> 300")
    assert changed["RelayDestinationBackedOff"]["for"] == "2h"
    assert all('{job="relay"' in rule["expr"] for rule in changed.values())
    assert all(rule["labels"]["team"] == "platform" for rule in changed.values())
    manifest = yaml.safe_load(render(chart, values)[TEMPLATE])
    assert manifest["metadata"]["labels"]["release"] == "kube-prometheus-stack"
