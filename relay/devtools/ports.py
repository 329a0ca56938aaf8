"""Ports for the servers `relay dev`, the tests and the benches start and hand to a process.

A port learnt by binding port 0 and closing the socket is one from the kernel's ephemeral
range: until the server binds it, any outgoing connection on the machine (a test's Redis
client, an HTTP request) may be given it as its local port, and the server then fails with
"address already in use" (CI saw a `relay worker` do so). So the ports handed out here come
from below that range, where the kernel never picks, and one process never hands out the same
port twice. Processes that run side by side (the test suite's xdist workers) each take a slice
of their own (`use_slice`), so they cannot pick one another's ports either.
"""

from __future__ import annotations

import random
import socket
import threading
from collections.abc import Collection
from pathlib import Path

# Ports below this are left to system services and to what people run by hand (8000, 8080).
_LOWEST = 10_000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


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
    """Hands out the ports of one range in turn from a random start: a port once handed out
    is not handed out again until the whole range has gone round."""

    def __init__(self, ports: range) -> None:
        self._lock = threading.Lock()
        self._ports = ports
        self._next = random.randrange(len(ports))  # noqa: S311 - not a secret

    def set_range(self, ports: range) -> None:
        with self._lock:
            self._ports = ports
            self._next = random.randrange(len(ports))  # noqa: S311 - not a secret

    def take(self, avoid: Collection[int], count: int = 1) -> int:
        """The first of `count` consecutive ports, all free and none in `avoid`."""
        with self._lock:
            for _ in range(len(self._ports)):
                if self._next + count > len(self._ports):
                    self._next = 0  # a run does not wrap round the end of the range
                first = self._ports[self._next]
                self._next += 1
                run = range(first, first + count)
                if all(port not in avoid and _bindable(port) for port in run):
                    self._next += count - 1  # the rest of the run is handed out with it
                    return first
        raise OSError(f"no {count} free ports in {self._ports.start}-{self._ports.stop - 1}")


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
    """A port free now that no outgoing connection will be given and that this process has
    not handed out before; not one of `avoid` (ports about to be taken)."""
    return _PORTS.take(avoid)


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports (a server that listens on its port and the
    next ones, as `relay dev` does), none of which this process hands out again."""
    return _PORTS.take((), count)


def use_slice(index: int, count: int) -> None:
    """Hand out only the `index`-th of `count` equal slices of the ports (one per process
    that runs beside the others, as the test suite's xdist workers do)."""
    ports = _pickable()
    size = len(ports) // count
    start = ports.start + index * size
    _PORTS.set_range(range(start, start + size))
