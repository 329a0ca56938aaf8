"""Hostile clients at the API's edge (#24, findings 3 and 4): endless headers and idle sockets.

    uv run python bench/http_edges.py [--compare /path/to/other/checkout] [--seconds 10]

Starts Redis and `relay api` in its own process (so its memory is its own), then:
- **headers**: 16 connections each stream one header value as fast as they can for
  `--seconds` (or until the API answers or closes), while /healthz is asked every 0.1 s.
  Reported: what the connections got to send, the API's RSS before and at its peak, and the
  slowest /healthz answer.
- **idle**: with RELAY_HTTP_MAX_CONCURRENCY=50, 55 connections that send nothing (opened again
  whenever the API closes one), while 44 real requests are made over the same time. Reported:
  how the real requests were answered.

`--compare DIR` runs the same against another checkout's `relay` package (for example main
before a change), in the same run, each side after the other.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
from upload_memory import RssSampler, status_kib, wait_ready

from relay.devtools.embedded_redis import embedded_redis
from relay.devtools.ports import free_port

RELAY_KEY = "bench-relay-key-0123456789"
FLOODS = 16
IDLE = 55
REAL = 44


@dataclass
class Flood:
    sent: int = 0
    answer: bytes = b""


def flood(port: int, seconds: float, result: Flood) -> None:
    block = b"a" * 65536
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nX-Flood: ")
        sock.settimeout(0.5)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                result.sent += sock.send(block)
            except TimeoutError:
                continue
            except OSError:
                break
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError, OSError):
                result.answer = sock.recv(200)
                break
            sock.settimeout(0.5)


def healthz_times(port: int, stop: threading.Event, times: list[float]) -> None:
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            started = time.perf_counter()
            with contextlib.suppress(httpx.HTTPError):
                client.get(f"http://127.0.0.1:{port}/healthz")
            times.append(time.perf_counter() - started)
            stop.wait(0.1)


def headers_round(port: int, pid: int, seconds: float) -> str:
    before = status_kib(pid, "VmRSS")
    floods = [Flood() for _ in range(FLOODS)]
    stop = threading.Event()
    times: list[float] = []
    prober = threading.Thread(target=healthz_times, args=(port, stop, times))
    threads = [threading.Thread(target=flood, args=(port, seconds, f)) for f in floods]
    with RssSampler(pid) as sampler:
        started = time.monotonic()
        prober.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # /healthz is watched for the whole time, however soon the floods were stopped.
        stop.wait(max(0.0, started + seconds - time.monotonic()))
        stop.set()
        prober.join()
    answered = Counter(f.answer.split(b"\r\n")[0].decode() or "(closed, no answer)" for f in floods)
    sent = [f.sent / 2**20 for f in floods]
    return (
        f"headers: {FLOODS} connections sent {statistics.median(sent):.1f} MiB each (median; "
        f"max {max(sent):.1f}), answered {dict(answered)}; API RSS {before / 1024:.0f} -> "
        f"peak {sampler.peak_kib / 1024:.0f} MiB; /healthz slowest {max(times):.2f} s "
        f"of {len(times)}"
    )


def hold_idle(port: int, stop: threading.Event) -> None:
    """IDLE connections that send nothing; one the API closes is opened again."""
    socks: list[socket.socket] = []
    try:
        while not stop.is_set():
            for sock in [s for s in socks if closed(s)]:
                socks.remove(sock)
                sock.close()
            while len(socks) < IDLE:
                socks.append(socket.create_connection(("127.0.0.1", port)))
            stop.wait(0.05)
    finally:
        for sock in socks:
            sock.close()


def closed(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def idle_round(port: int, seconds: float) -> str:
    stop = threading.Event()
    holder = threading.Thread(target=hold_idle, args=(port, stop))
    holder.start()
    time.sleep(0.5)
    statuses: Counter[str] = Counter()
    try:
        for _ in range(REAL):
            try:
                statuses[str(httpx.get(f"http://127.0.0.1:{port}/healthz").status_code)] += 1
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1
            time.sleep(seconds / REAL)
    finally:
        stop.set()
        holder.join()
    return f"idle: {IDLE} idle connections, {REAL} real requests answered {dict(statuses)}"


@contextlib.contextmanager
def api(redis_url: str, source: str | None, extra: dict[str, str]) -> Iterator[tuple[int, int]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "CHAMELAION_"))}
    env |= {
        "CHAMELAION_API_KEY": "unused",
        "CHAMELAION_BASE_URL": "http://127.0.0.1:9/api",
        "RELAY_API_KEYS": RELAY_KEY,
        "RELAY_REDIS_URL": redis_url,
        "RELAY_LOG_LEVEL": "error",
        "PYTHONDONTWRITEBYTECODE": "1",
        **extra,
    }
    if source is not None:
        env["PYTHONPATH"] = source
    # Run from the checkout measured: `-m` puts the working directory first on the path.
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay.cli", "api", "--port", str(port)],
        env=env,
        cwd=source or os.getcwd(),
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}/healthz", proc)
        yield port, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", help="another checkout to run the same against")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    with embedded_redis() as redis_url:
        for source in [None, args.compare] if args.compare else [None]:
            print(f"== {source or 'this checkout'}", flush=True)
            with api(redis_url, source, {}) as (port, pid):
                print(headers_round(port, pid, args.seconds), flush=True)
            with api(redis_url, source, {"RELAY_HTTP_MAX_CONCURRENCY": "50"}) as (port, _):
                print(idle_round(port, args.seconds), flush=True)
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
