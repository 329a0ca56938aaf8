"""What a running relay exports, and the PromQL names the chart's alerts and dashboard use that it
does not: so a rule or a panel can never wait on a series the relay lacks (a misspelt metric, a
renamed one, a label value no code path sets).

`exported` starts a whole stack (the API, a `relay worker` process, the sandbox upstream and a
real Redis), sends one job through it and reads both processes' /metrics.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import httpx
import promql_parser
from prometheus_client.parser import text_string_to_metric_families

from tests.stack import relay_stack

# Added by Prometheus (target labels from the ServiceMonitors), never by the relay.
TARGET_LABELS = frozenset(
    {"namespace", "service", "job", "pod", "instance", "container", "endpoint"}
)
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
}
# A regex matcher the check can read: plain names joined by |.
ALTERNATIVES = re.compile(r"[A-Za-z0-9_]+(\|[A-Za-z0-9_]+)*")


@dataclass
class Exported:
    names: set[str] = field(default_factory=set)
    # sample name -> label -> the values seen
    values: dict[str, dict[str, set[str]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(set))
    )

    def add(self, text: str) -> None:
        for family in text_string_to_metric_families(text):
            for suffix in SUFFIXES.get(family.type, ("",)):
                self.names.add(family.name + suffix)
            for sample in family.samples:
                self.names.add(sample.name)
                for label, value in sample.labels.items():
                    self.values[sample.name][label].add(value)


def exported(redis_url: str) -> Exported:
    found = Exported()
    with relay_stack(redis_url) as stack:
        stack.sdk().lipsync.generate(
            inputs=[
                {"type": "video", "url": "https://cdn.example.com/v.mp4"},
                {"type": "audio", "url": "https://cdn.example.com/a.wav"},
            ],
            extra_body={"callback_url": stack.callback_url},
        )
        stack.receiver.wait_for(1)
        found.add(httpx.get(stack.api_url + "/metrics").text)
        found.add(stack.worker_metrics())
    return found


def selectors(expr: str) -> list[promql_parser.VectorSelector]:
    """Every series selector of a PromQL expression, however deeply nested."""
    found: list[promql_parser.VectorSelector] = []

    def walk(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)
        elif isinstance(node, promql_parser.MatrixSelector):
            walk(node.vector_selector)
        elif isinstance(node, promql_parser.Call):
            for arg in node.args:
                walk(arg)
        elif isinstance(node, promql_parser.BinaryExpr):
            walk(node.lhs)
            walk(node.rhs)
        elif isinstance(
            node,
            (
                promql_parser.AggregateExpr,
                promql_parser.ParenExpr,
                promql_parser.UnaryExpr,
                promql_parser.SubqueryExpr,
            ),
        ):
            walk(node.expr)
            if isinstance(node, promql_parser.AggregateExpr) and node.param is not None:
                walk(node.param)

    walk(promql_parser.parse(expr))
    return found


def unknown(expr: str, exported: Exported) -> list[str]:
    """The metric names, and label values matched on, of `expr` that the relay does not export."""
    problems: list[str] = []
    for selector in selectors(expr):
        name = selector.name
        if name is None or name not in exported.names:
            problems.append(f"metric {name!r}")
            continue
        for matcher in selector.matchers.matchers:
            if matcher.name in TARGET_LABELS or matcher.name == "__name__":
                continue
            if "$" in matcher.value:
                continue  # a dashboard variable: its values are read from the relay's series
            seen = exported.values.get(name, {}).get(matcher.name, set())
            if matcher.op in (promql_parser.MatchOp.Equal, promql_parser.MatchOp.NotEqual):
                wanted = {matcher.value}
            elif ALTERNATIVES.fullmatch(matcher.value):
                wanted = set(matcher.value.split("|"))
            else:
                problems.append(f"{name}: a regex the check cannot read: {matcher.value!r}")
                continue
            problems += [f"{name}{{{matcher.name}={value!r}}}" for value in wanted - seen]
    return problems
