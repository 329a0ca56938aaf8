"""Ports for the servers `relay dev`, the tests and the benches start and hand to a process.

A port learnt by binding port 0 and closing the socket is one from the kernel's ephemeral
range: until the server binds it, any outgoing connection on the machine (a test's Redis
client, an HTTP request) may be given it as its local port, and the server then fails with
"address already in use" (CI saw a `relay worker` do so). So the ports handed out here come
from below that range, where the kernel never picks.

Other processes pick from the same range: the suite's xdist processes, a second suite run
beside the first, `relay dev` and benches. A port handed out is therefore also reserved for a
while, machine-wide, by a lock on a file named for it (released by the kernel when the process
ends): no process hands out a port another has reserved, so a server has that long to bind
it. Within a process, ports are handed out in turn from a random start, so one handed out
is not handed out again until the whole range has gone round.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Collection
from pathlib import Path

# Ports below this are left to system services and to what people run by hand (8000, 8080).
_LOWEST = 10_000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# How long a port handed out stays reserved: a server bound it long before (a cold `relay
# worker` process binds within seconds). Reservations past the count are let go sooner, so a
# process that takes thousands of ports does not hold a file each.
RESERVED_FOR = 60.0
MAX_RESERVED = 256
_LOCKS = Path(tempfile.gettempdir()) / "relay-ports"


def _pickable() -> range:
    """The ports below the kernel's ephemeral range, or above it where it starts too low."""
    try:
        low, high = (int(part) for part in _EPHEMERAL_RANGE.read_text().split())
    except (OSError, ValueError):
        low, high = 32_768, 60_999  # Linux's default; other systems' ranges lie within it
    if low - _LOWEST >= 4_096:
        return range(_LOWEST, low)
    return range(high + 1, 65_536)


class _Ports:
    """Hands out the ports of one range in turn, each reserved machine-wide for a while."""

    def __init__(self, ports: range) -> None:
        self._lock = threading.Lock()
        self._ports = ports
        self._next = random.randrange(len(ports))  # noqa: S311 - not a secret
        # (when reserved, the open lock file) of the ports this process reserves, oldest first.
        self._reserved: deque[tuple[float, int]] = deque()

    def set_range(self, ports: range) -> None:
        with self._lock:
            self._ports = ports
            self._next = 0

    def take(self, avoid: Collection[int], count: int = 1) -> int:
        """The first of `count` consecutive ports, all free and none in `avoid`."""
        with self._lock:
            self._let_go(time.monotonic() - RESERVED_FOR)
            for _ in range(len(self._ports)):
                if self._next + count > len(self._ports):
                    self._next = 0  # a run does not wrap round the end of the range
                first = self._ports[self._next]
                self._next += 1
                run = range(first, first + count)
                if any(port in avoid for port in run):
                    continue
                held = self._reserve(run)
                if held is not None and all(_bindable(port) for port in run):
                    self._next += count - 1  # the rest of the run is handed out with it
                    now = time.monotonic()
                    self._reserved.extend((now, fd) for fd in held)
                    return first
                for fd in held or ():
                    os.close(fd)
        raise OSError(f"no {count} free ports in {self._ports.start}-{self._ports.stop - 1}")

    def _reserve(self, run: range) -> list[int] | None:
        """Lock files of every port of `run`, or None when another process holds one."""
        _LOCKS.mkdir(exist_ok=True)
        held: list[int] = []
        for port in run:
            fd = os.open(_LOCKS / str(port), os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                for taken in held:
                    os.close(taken)
                return None
            held.append(fd)
        return held

    def _let_go(self, before: float) -> None:
        """Release the reservations made before `before`, and the oldest past the count."""
        while self._reserved and (
            self._reserved[0][0] < before or len(self._reserved) > MAX_RESERVED
        ):
            _, fd = self._reserved.popleft()
            with contextlib.suppress(OSError):
                os.close(fd)  # closing it releases the lock


def _bindable(port: int) -> bool:
    """Whether a server could bind `port` now, on every address (the relay's worker binds
    0.0.0.0, which conflicts with a socket on any address)."""
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


_PORTS = _Ports(_pickable())


def free_port(avoid: Collection[int] = ()) -> int:
    """A port free now that no outgoing connection will be given, and that neither this
    process nor another will hand out for a while; not one of `avoid` (ports about to be
    taken)."""
    return _PORTS.take(avoid)


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports (a server that listens on its port and the
    next ones, as `relay dev` does), each reserved as `free_port`'s are."""
    return _PORTS.take((), count)


def use_range(ports: range) -> None:
    """Hand out only `ports` from now on, in order from the first (a test of this module)."""
    _PORTS.set_range(ports)
