"""The package's shape: floors that imports only go down, no import cycles, a short top level,
scripts that name their owner, and a sandbox that stands apart from the relay it stands in for.

The floors are written down in docs/architecture.md ("Floors"); this test holds the same list
and checks both the code and that page against it.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

import relay
from relay.delivery.store import FIELDS as DELIVERY_FIELDS

PACKAGE = Path(relay.__file__).parent
ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"

# Bottom first. A module imports from its own floor and the floors below it, never from one
# above; the most specific prefix places a module (relay.api.app wires, above relay.api).
FLOORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "base",
        (
            "relay.errors",
            "relay.http_client",
            "relay.http_urls",
            "relay.jitter",
            "relay.lifecycle",
            "relay.logs",
            "relay.metrics",
            "relay.signing",
            "relay.tracing",
        ),
    ),
    ("settings", ("relay.settings",)),
    ("callers", ("relay.callers",)),
    ("redis", ("relay.redis",)),
    ("upstream", ("relay.upstream",)),
    ("jobs", ("relay.jobs",)),
    ("delivery", ("relay.delivery",)),
    ("api", ("relay.api",)),
    ("console", ("relay.console",)),
    ("processes", ("relay.api.app", "relay.serving", "relay.worker")),
    ("commands", ("relay.cli", "relay.devtools")),
)
# Outside the floors: development tooling that imports nothing from the relay (checked below).
APART = ("relay.sandbox",)
MAX_TOP_LEVEL_MODULES = 12


def module_names(root: Path) -> dict[str, Path]:
    """Every module of the package at `root`, by dotted name (a package by its own name)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_modules(path: Path) -> set[str]:
    """Every absolute import in `path`, anywhere in it (also inside functions and
    TYPE_CHECKING blocks): `from a import b` counts as `a` and as `a.b`."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's own modules it imports. A package counts (its __init__ runs),
    except where a module of it is named as well: `from a import b` is `a.b` when b is one."""
    modules = module_names(root)
    graph = {}
    for name, path in modules.items():
        targets = {target for target in imported_modules(path) if target in modules}
        parents = {target.rpartition(".")[0] for target in targets}
        graph[name] = {target for target in targets if target not in parents} - {name}
    return graph


def floor_of(module: str, floors: Iterable[tuple[str, tuple[str, ...]]]) -> int | None:
    best: tuple[int, int] | None = None  # (prefix length, floor index)
    for index, (_, prefixes) in enumerate(floors):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (
                best is None or len(prefix) > best[0]
            ):
                best = (len(prefix), index)
    return None if best is None else best[1]


def upward_imports(
    graph: Mapping[str, set[str]],
    floors: tuple[tuple[str, tuple[str, ...]], ...],
    apart: tuple[str, ...] = (),
) -> list[str]:
    """Each import that runs up the floors, and each module on no floor, as a line to read."""
    problems = []
    for module in sorted(graph):
        if module.partition(".")[2] == "" or module.startswith(apart):
            continue  # the package itself (empty), and what stands apart
        mine = floor_of(module, floors)
        if mine is None:
            problems.append(f"{module} is on no floor")
            continue
        for target in sorted(graph[module]):
            theirs = floor_of(target, floors)
            if theirs is not None and theirs > mine:
                problems.append(
                    f"{module} ({floors[mine][0]}) imports {target} ({floors[theirs][0]})"
                )
    return problems


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The import cycles: every group of modules that reach each other (Tarjan's SCCs)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


# -- the relay ---------------------------------------------------------------------------------


def test_imports_never_run_up_the_floors() -> None:
    assert upward_imports(import_graph(PACKAGE), FLOORS, APART) == []


def test_no_import_cycles() -> None:
    assert cycles(import_graph(PACKAGE)) == []


def test_the_floors_on_the_architecture_page_are_the_ones_enforced_here() -> None:
    text = ARCHITECTURE.read_text()
    section = text.split("\n## Floors", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| *(\d+) *\| *(\w+) *\| *(.+?) *\|", section, flags=re.MULTILINE)
    written = [
        (name, tuple(sorted(re.findall(r"`(relay[\w.]*)`", modules))))
        for _, name, modules in sorted(rows, key=lambda row: int(row[0]))
    ]
    assert written == [(name, tuple(sorted(prefixes))) for name, prefixes in FLOORS]


def test_at_most_twelve_modules_directly_in_the_package() -> None:
    top = [path.stem for path in PACKAGE.glob("*.py") if path.name != "__init__.py"]
    assert len(top) <= MAX_TOP_LEVEL_MODULES, sorted(top)


def test_every_script_is_named_after_the_module_that_runs_it() -> None:
    # `<module>.lua`, or `<module>.<name>.lua` registered there as `name`
    # (relay.redis.scripts.register(redis, __name__, name)).
    scripts = sorted(PACKAGE.rglob("*.lua"))
    assert len(scripts) >= 8
    for script in scripts:
        owner = script.name.partition(".")[0]
        assert script.with_name(f"{owner}.py").exists(), (
            f"{script.relative_to(PACKAGE)} has no {owner}.py beside it"
        )


def test_every_script_names_its_keys_and_arguments() -> None:
    scripts = sorted(PACKAGE.rglob("*.lua"))
    assert len(scripts) >= 8
    for script in scripts:
        for line in script.read_text().splitlines():
            stripped = line.strip()
            if "KEYS[" in stripped or "ARGV[" in stripped:
                # Positional access only in a named local at the top (or the ARGV loop of a
                # variadic script).
                assert stripped.startswith("local ") or "#ARGV" in stripped, (
                    f"{script.name}: {stripped}"
                )


def string_constants(path: Path) -> set[str]:
    """Every str or bytes literal in `path` (bytes decoded), docstrings included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str | bytes):
            value = node.value
            found.add(value.decode(errors="replace") if isinstance(value, bytes) else value)
    return found


def test_only_the_delivery_stage_names_the_fields_of_a_delivery() -> None:
    # A delivery's fields share its job's hash; the floors below the delivery stage read the job
    # and never the delivery's part of it (relay.delivery.store.Delivery reads that).
    below = [name for name, _ in FLOORS[: [name for name, _ in FLOORS].index("delivery")]]
    for name, path in module_names(PACKAGE).items():
        floor = floor_of(name, FLOORS)
        if floor is None or FLOORS[floor][0] not in below:
            continue
        named = string_constants(path) & set(DELIVERY_FIELDS)
        assert not named, f"{name} names the delivery's fields {sorted(named)}"
    # Nor do their scripts, save the job's end, which files the delivery in the same step.
    for script in PACKAGE.rglob("*.lua"):
        floor = floor_of(".".join(("relay", *script.relative_to(PACKAGE).parent.parts)), FLOORS)
        if floor is None or FLOORS[floor][0] not in below or script.name == "store.end.lua":
            continue
        quoted = set(re.findall(r"""['"](\w+)['"]""", script.read_text()))
        assert not quoted & set(DELIVERY_FIELDS), f"{script.name} names the delivery's fields"


# How the relay reaches Redis (docs/architecture.md, "How the relay reaches Redis"): through
# relay.redis.batch. The exceptions, each for a connection of its own, by module and method:
OWN_CONNECTION = {
    # WAIT counts the writes made on its own connection and holds it until replicas answer:
    # the new job's script and the WAIT share a redis-py pipeline, off the batcher's line.
    ("relay.jobs.store", "pipeline"),
    ("relay.jobs.store", "wait"),
    ("relay.jobs.store", "execute"),
    # A subscribed connection takes no other commands.
    ("relay.api.waiters", "pubsub"),
    # The clock's sample times its own round trip, which a batch would stretch.
    ("relay.redis.clock", "time"),
}
# The plumbing that holds the client: the batcher itself, scripts' registration, connecting.
# Development tooling (its own clients) stands apart.
CLIENT_HOLDERS = ("relay.redis.batch", "relay.redis.scripts", "relay.redis.conn")
CLIENT = re.compile(r"(^|\.)_?(redis|pipe)$")


def client_calls(path: Path) -> set[str]:
    """The methods called on a Redis client (an expression named `redis`, `pipe`...) in `path`,
    and every `pipeline(...)` or `pubsub(...)` whatever it is called on."""
    called = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            method = node.func.attr
            if CLIENT.search(ast.unparse(node.func.value)) or method in ("pipeline", "pubsub"):
                called.add(method)
    return called


def test_the_relay_reaches_redis_through_the_batcher() -> None:
    found = []
    for name, path in module_names(PACKAGE).items():
        if name in CLIENT_HOLDERS or name.startswith(("relay.sandbox", "relay.devtools")):
            continue
        for method in sorted(client_calls(path)):
            if (name, method) not in OWN_CONNECTION:
                found.append(f"{name} calls the client's {method}()")
    assert found == []


def test_a_call_on_the_client_is_found(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text(
        "async def f(self, state, redis, pool):\n"
        "    await self.redis.get('k')\n"
        "    await state.redis.set('k', 1)\n"
        "    await redis.zrem('k', 'm')\n"
        "    async with pool.pipeline() as pipe:\n"
        "        pipe.zadd('k', {'m': 1})\n"
        "    await batcher(redis).run([('GET', 'k')])\n"
    )
    assert client_calls(path) == {"get", "set", "zrem", "pipeline", "zadd"}


def test_the_sandbox_imports_nothing_from_the_relay() -> None:
    sandbox = sorted((PACKAGE / "sandbox").glob("*.py"))
    assert sandbox
    for path in sandbox:
        relay_imports = {
            name
            for name in imported_modules(path)
            if name == "relay"
            or (name.startswith("relay.") and not name.startswith("relay.sandbox"))
        }
        assert not relay_imports, f"{path.name} imports {sorted(relay_imports)}"


def test_the_relay_outside_devtools_never_imports_the_sandbox_or_devtools() -> None:
    # Both are left out of the wheel: a production import of either would fail in the image.
    # The CLI may name them, behind the check that they are installed.
    for path in PACKAGE.rglob("*.py"):
        part = path.relative_to(PACKAGE).parts[0]
        if part in ("sandbox", "devtools") or path.name == "cli.py":
            continue
        dev_imports = {
            name
            for name in imported_modules(path)
            if name.startswith(("relay.sandbox", "relay.devtools"))
        }
        assert not dev_imports, f"{path.relative_to(PACKAGE)} imports {sorted(dev_imports)}"


# -- the checks themselves, on a package planted with what they must find ----------------------

PLANTED_FLOORS = (("low", ("pkg.low",)), ("high", ("pkg.high",)))


def plant(root: Path, files: Mapping[str, str]) -> Path:
    package = root / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package


def test_an_upward_import_is_found(tmp_path: Path) -> None:
    package = plant(
        tmp_path,
        {
            "low/__init__.py": "",
            "low/store.py": "from pkg.high import view\n",
            "high/__init__.py": "",
            "high/view.py": "from pkg.low import store\n",
        },
    )
    assert upward_imports(import_graph(package), PLANTED_FLOORS) == [
        "pkg.low.store (low) imports pkg.high.view (high)"
    ]


@pytest.mark.parametrize(
    "text",
    [
        "from pkg.high import view\n",
        "import pkg.high.view\n",
        "def f() -> None:\n    from pkg.high.view import x\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.high.view import x\n",
    ],
)
def test_every_way_of_importing_counts(tmp_path: Path, text: str) -> None:
    package = plant(
        tmp_path,
        {"low/__init__.py": "", "low/store.py": text, "high/__init__.py": "", "high/view.py": ""},
    )
    assert upward_imports(import_graph(package), PLANTED_FLOORS) == [
        "pkg.low.store (low) imports pkg.high.view (high)"
    ]


def test_a_module_on_no_floor_is_found(tmp_path: Path) -> None:
    package = plant(tmp_path, {"low/__init__.py": "", "stray.py": ""})
    assert upward_imports(import_graph(package), PLANTED_FLOORS) == ["pkg.stray is on no floor"]


def test_a_cycle_is_found_even_within_one_floor(tmp_path: Path) -> None:
    package = plant(
        tmp_path,
        {
            "low/__init__.py": "",
            "low/a.py": "from pkg.low import b\n",
            "low/b.py": "from pkg.low.c import x\n",
            "low/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from pkg.low.a import y\n",
            "low/d.py": "from pkg.low import a\n",
        },
    )
    graph = import_graph(package)
    assert upward_imports(graph, PLANTED_FLOORS) == []
    assert cycles(graph) == [["pkg.low.a", "pkg.low.b", "pkg.low.c"]]
