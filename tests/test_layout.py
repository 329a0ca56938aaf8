"""The package's shape: the sandbox stands apart from the relay it is a stand-in for."""

from __future__ import annotations

import ast
from pathlib import Path

import relay

PACKAGE = Path(relay.__file__).parent


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


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
