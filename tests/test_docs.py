"""The docs stay in step with the code, and the README stays a landing page.

Every setting has its row in docs/configuration.md (with the default the code has), every metric
and Redis key is in the operations and architecture docs, and every relative link in the README,
docs/ and bench/README.md reaches a file and, where it names one, a heading that exists. The code
blocks of every Markdown file are checked by `ruff format --check`, not here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

from relay import metrics
from relay.redis import keys
from relay.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"
MARKDOWN = (README, *sorted(DOCS.glob("*.md")), ROOT / "bench" / "README.md")
# The README is a landing page: what it is, the two commands, one example, the callback, links.
MAX_README_LINES = 220
# What a newcomer runs first, exactly as .ci/run and the hooks expect it.
FIRST_COMMANDS = ["uv run relay dev", "uv run pytest"]

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
VARIABLE = re.compile(r"`([A-Z][A-Z0-9_]+)`")
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:")


def prose(text: str) -> Iterator[str]:
    """The lines of a Markdown text outside its fenced code blocks."""
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            yield line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in prose(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> Iterator[str]:
    for line in prose(path.read_text(encoding="utf-8")):
        yield from LINK.findall(INLINE_CODE.sub("", line))


def table_rows(path: Path) -> Iterator[list[str]]:
    for line in prose(path.read_text(encoding="utf-8")):
        if line.startswith("|") and not re.match(r"^\|[\s|:-]+\|$", line):
            yield [cell.strip() for cell in line.strip().strip("|").split("|")]


def setting_variables() -> dict[str, Any]:
    """Each setting's environment variable and its default."""
    found: dict[str, Any] = {}
    for name, field in Settings.model_fields.items():
        assert isinstance(field.validation_alias, str), f"{name} has no variable name"
        found[field.validation_alias] = field.default
    return found


def documented_defaults() -> dict[str, str]:
    """The default column of docs/configuration.md's rows, by variable (`A` / `B` rows split)."""
    found: dict[str, str] = {}
    for row in table_rows(CONFIGURATION):
        # OTEL_* variables are the OpenTelemetry SDK's own, read by it, not settings.
        variables = [name for name in VARIABLE.findall(row[0]) if not name.startswith("OTEL_")]
        if not variables or len(row) < 3:
            continue
        defaults = [cell.strip() for cell in row[1].split(" / ")]
        if len(defaults) == 1:
            defaults *= len(variables)
        assert len(defaults) == len(variables), f"defaults do not pair up in {row[0]}"
        for variable, default in zip(variables, defaults, strict=True):
            assert variable not in found, f"{variable} has two rows"
            found[variable] = default
    return found


def as_documented(value: Any) -> str:
    """A default as the configuration table writes it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, tuple):
        return ",".join(as_documented(item) for item in value)
    return str(value)


def test_every_setting_has_a_row_in_configuration_md() -> None:
    settings, documented = set(setting_variables()), set(documented_defaults())
    assert sorted(settings - documented) == [], "settings missing from docs/configuration.md"
    assert sorted(documented - settings) == [], "documented settings that do not exist"


def test_documented_defaults_are_the_settings_defaults() -> None:
    documented = documented_defaults()
    for variable, default in setting_variables().items():
        cell = documented[variable]
        if default is None or default == ():
            assert cell.startswith(("required", "derived")), (variable, cell)
        elif default == "":
            assert cell == "empty", (variable, cell)
        else:
            assert cell == f"`{as_documented(default)}`", (variable, cell)


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_reach_a_file_and_heading(path: Path) -> None:
    broken = []
    for target in links(path):
        if SCHEME.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        exists = linked.exists()
        if not exists or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
            broken.append(target)
    assert broken == [], f"links in {path.relative_to(ROOT)} that lead nowhere"


def test_readme_is_a_landing_page_that_starts_with_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= MAX_README_LINES, "move reference material into docs/"
    opening = next(number for number, line in enumerate(lines) if FENCE.match(line))
    assert opening < 5, "the commands come first"
    block = lines[opening + 1 : opening + 1 + len(FIRST_COMMANDS)]
    assert [line.partition("#")[0].strip() for line in block] == FIRST_COMMANDS


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert FIRST_COMMANDS[1] in [line.strip() for line in ci]


def test_every_metric_is_described_in_operations_md() -> None:
    text = (DOCS / "operations.md").read_text(encoding="utf-8")
    collectors = [c for c in vars(metrics).values() if isinstance(c, MetricWrapperBase)]
    assert collectors
    names = []
    for collector in collectors:
        (family,) = collector.describe()
        names.append(family.name + ("_total" if family.type == "counter" else ""))
    missing = [name for name in names if not re.search(rf"`{name}[`{{]", text)]
    assert missing == [], "metrics missing from docs/operations.md"


def test_every_redis_key_is_in_architecture_md() -> None:
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    assert keys.__doc__
    listed = [
        re.split(r"\s+(?:hash|string|zset|list|stream|channel)\s", line)[0].strip()
        for line in keys.__doc__.splitlines()
        if line.startswith(("relay:", "arq:"))
    ]
    assert len(listed) > 20
    missing = [key for key in listed if f"`{key}`" not in text]
    assert missing == [], "Redis keys missing from docs/architecture.md"
