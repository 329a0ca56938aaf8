"""A 1 GiB upload through the relay: the API process's memory, and its speed against direct.

    uv run python bench/upload_memory.py [--video-mib 1024] [--rounds 5] [--api-env NAME=VALUE]
                                         [--relay-fields]

Starts Redis, the sandbox upstream (`relay sandbox`) and the relay API (`relay api`), each in its
own process, so the API's resident memory is measured for that process alone. Then, alternately,
sends the same generate-with-media form straight to the sandbox and through the relay, from
one plain socket (the data is one random MiB sent again and again: nothing on disk, and next to
no client CPU). The sandbox counts and hashes every byte it receives; each run is checked.

Reported: the API's RSS just before the relay upload, its peak during it (VmHWM, reset first
through /proc/PID/clear_refs, cross-checked by sampling VmRSS), and the throughput of each
path, first byte sent to answer read. `--relay-fields`: the relayed form also carries
`callback_events` and `callback_metadata` as the official SDK sends them (a part per value).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from relay.devtools.embedded_redis import embedded_redis
from relay.devtools.ports import free_port

SANDBOX_KEY = "sandbox-key"
RELAY_KEY = "bench-relay-key-0123456789"  # keys are at least 16 characters
PATH = "/api/v1/lipsync/generate-with-media"
BOUNDARY = os.urandom(16).hex()  # as httpx, and so the official SDK, makes them
MiB = 1024 * 1024
BLOCK = os.urandom(MiB)
AUDIO = os.urandom(MiB)
CALLBACK = "http://127.0.0.1:9/hook"
EVENTS = ("lipsync.processing", "lipsync.completed", "lipsync.failed")
METADATA: dict[str, str | dict[str, str]] = {
    "episode": "42",
    "language": "ja",
    "route": {"team": "dubbing", "queue": "bulk"},
}


@dataclass
class Run:
    path: str
    seconds: float
    bytes_sent: int

    @property
    def mb_per_s(self) -> float:
        return self.bytes_sent / self.seconds / 1e6


def field(name: str, value: str) -> bytes:
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
    return (head + value + "\r\n").encode()


def file_head(name: str, filename: str) -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"'
        "\r\nContent-Type: application/octet-stream\r\n\r\n"
    ).encode()


def relay_fields() -> bytes:
    """callback_events and callback_metadata, flattened into parts as the official SDK does."""
    parts = [field("callback_events[]", event) for event in EVENTS]
    for key, value in METADATA.items():
        if isinstance(value, dict):
            parts += [
                field(f"callback_metadata[{key}][{sub}]", text) for sub, text in value.items()
            ]
        else:
            parts.append(field(f"callback_metadata[{key}]", value))
    return b"".join(parts)


def upload(
    port: int, key: str, video_mib: int, *, callback: bool, extra: bytes = b""
) -> tuple[Run, dict[str, str]]:
    """POST the form over a raw socket; return the timing and the JSON answer."""
    lead = field("reference_id", "bench")
    if callback:
        lead = field("callback_url", CALLBACK) + extra + lead
    lead += file_head("video", "episode.mp4")
    tail = b"\r\n" + file_head("audio", "dub.wav") + AUDIO + f"\r\n--{BOUNDARY}--\r\n".encode()
    length = len(lead) + video_mib * MiB + len(tail)
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nx-api-key: {key}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {length}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        started = time.perf_counter()
        sock.sendall(head + lead)
        for _ in range(video_mib):
            sock.sendall(BLOCK)
        sock.sendall(tail)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        seconds = time.perf_counter() - started
    status_line, _, rest = answer.partition(b"\r\n")
    body = rest.partition(b"\r\n\r\n")[2]
    if b" 200 " not in status_line:
        raise SystemExit(f"upload failed: {status_line.decode()} {body.decode()}")
    return Run("relay" if callback else "direct", seconds, length), json.loads(body)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU time of the whole machine so far, from /proc/stat, in clock ticks."""
    ticks = [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]
    return sum(ticks) - idle, sum(ticks)


def status_kib(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{name} not in /proc/{pid}/status")


class RssSampler:
    """Samples VmRSS every 5 ms in a thread; `peak_kib` is the largest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, status_kib(self.pid, "VmRSS"))
            time.sleep(0.005)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url} exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str], ready_url: str) -> Iterator[int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(ready_url, proc)
        yield proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def expected_video_sha256(video_mib: int) -> str:
    digest = hashlib.sha256()
    for _ in range(video_mib):
        digest.update(BLOCK)
    return digest.hexdigest()


def check_received(sandbox_port: int, request_id: str, video_mib: int, sha256: str) -> None:
    url = f"http://127.0.0.1:{sandbox_port}/_sandbox/requests/{request_id}/uploads"
    received = httpx.get(url).json()["video"]
    if received["bytes"] != video_mib * MiB or received["sha256"] != sha256:
        raise SystemExit(f"the upstream did not get the video intact: {received}")


@dataclass
class Round:
    direct: Run
    relay: Run
    rss_before_kib: int
    rss_peak_kib: int
    api_cpu: float  # CPU seconds the API used for the relayed upload
    sandbox_cpu: float
    machine_busy: float  # share of all the machine's CPUs busy during the relayed upload

    def line(self, number: int) -> str:
        ratio = self.relay.mb_per_s / self.direct.mb_per_s
        return (
            f"round {number}: direct {self.direct.mb_per_s:4.0f} MB/s, relay "
            f"{self.relay.mb_per_s:4.0f} MB/s ({100 * ratio:3.0f} %); API RSS "
            f"{self.rss_before_kib / 1024:.1f} -> peak {self.rss_peak_kib / 1024:.1f} MiB; "
            f"CPU s: API {self.api_cpu:.2f}, sandbox {self.sandbox_cpu:.2f}; "
            f"machine {100 * self.machine_busy:.0f} % busy"
        )


def measure(
    ports: tuple[int, int], pids: tuple[int, int], video_mib: int, sha256: str, extra: bytes
) -> Round:
    """One direct upload, then the same through the relay with the API process watched."""
    (sandbox_port, api_port), (sandbox_pid, api_pid) = ports, pids
    direct, answer = upload(sandbox_port, SANDBOX_KEY, video_mib, callback=False)
    check_received(sandbox_port, answer["request_id"], video_mib, sha256)
    before = status_kib(api_pid, "VmRSS")
    Path(f"/proc/{api_pid}/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    cpu_before = cpu_seconds(api_pid), cpu_seconds(sandbox_pid), machine_busy()
    with RssSampler(api_pid) as sampler:
        relayed, answer = upload(api_port, RELAY_KEY, video_mib, callback=True, extra=extra)
    cpu_after = cpu_seconds(api_pid), cpu_seconds(sandbox_pid), machine_busy()
    check_received(sandbox_port, answer["request_id"], video_mib, sha256)
    busy = (cpu_after[2][0] - cpu_before[2][0]) / (cpu_after[2][1] - cpu_before[2][1])
    return Round(
        direct,
        relayed,
        before,
        max(status_kib(api_pid, "VmHWM"), sampler.peak_kib),
        api_cpu=cpu_after[0] - cpu_before[0],
        sandbox_cpu=cpu_after[1] - cpu_before[1],
        machine_busy=busy,
    )


def report(rounds: list[Round], started_kib: int, video_mib: int) -> None:
    direct = statistics.median(r.direct.mb_per_s for r in rounds)
    relay = statistics.median(r.relay.mb_per_s for r in rounds)
    growth = max(r.rss_peak_kib - r.rss_before_kib for r in rounds) / 1024
    from_start = (max(r.rss_peak_kib for r in rounds) - started_kib) / 1024
    gib = video_mib / 1024
    print(
        f"\n{video_mib} MiB video, {len(rounds)} rounds, {os.cpu_count()} CPUs; all bytes verified"
    )
    print(
        f"API RSS growth during an upload: at most {growth:.1f} MiB over the warm process, "
        f"{from_start:.1f} MiB over the freshly started one (target <= 64 MB)"
    )
    print(
        f"throughput (median): direct {direct:.0f} MB/s, relay {relay:.0f} MB/s = "
        f"{100 * relay / direct:.0f} % of direct (target >= 80 %)"
    )
    api_cpu = statistics.median(r.api_cpu for r in rounds) / gib
    sandbox_cpu = statistics.median(r.sandbox_cpu for r in rounds) / gib
    print(f"CPU per GiB relayed (median): API {api_cpu:.2f} s, sandbox {sandbox_cpu:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--api-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the API process, e.g. glibc malloc tunables",
    )
    parser.add_argument(
        "--relay-fields",
        action="store_true",
        help="relayed uploads also carry callback_events and callback_metadata",
    )
    args = parser.parse_args()
    video_mib: int = args.video_mib
    extra = relay_fields() if args.relay_fields else b""
    sha256 = expected_video_sha256(video_mib)
    ports = sandbox_port, api_port = free_port(), free_port()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "CHAMELAION_"))}

    with embedded_redis() as redis_url:
        api_env = {
            **base_env,
            "CHAMELAION_BASE_URL": f"http://127.0.0.1:{sandbox_port}/api",
            "CHAMELAION_API_KEY": SANDBOX_KEY,
            "RELAY_API_KEYS": RELAY_KEY,
            "RELAY_REDIS_URL": redis_url,
            "RELAY_LOG_FORMAT": "text",
            "RELAY_CALLBACK_ALLOWED_NETWORKS": "127.0.0.0/8",
            # Receivers listen on free loopback ports, outside the default port list.
            "RELAY_CALLBACK_ALLOWED_PORTS": "1-65535",
            **dict(item.partition("=")[::2] for item in args.api_env),
        }
        if args.api_env:
            print("API process environment:", " ".join(args.api_env))
        if extra:
            print(f"relayed forms carry callback_events and callback_metadata ({len(extra)} B)")
        sandbox = ["sandbox", "--port", str(sandbox_port)]
        api = ["api", "--port", str(api_port)]
        with (
            process(
                sandbox, base_env, f"http://127.0.0.1:{sandbox_port}/api/health"
            ) as sandbox_pid,
            process(api, api_env, f"http://127.0.0.1:{api_port}/healthz") as api_pid,
        ):
            started_kib = status_kib(api_pid, "VmRSS")
            # Warm both paths up (connections, imports, allocator arenas) before measuring.
            upload(sandbox_port, SANDBOX_KEY, 16, callback=False)
            upload(api_port, RELAY_KEY, 16, callback=True, extra=extra)
            warm_kib = status_kib(api_pid, "VmRSS")
            print(
                f"API RSS: {started_kib / 1024:.1f} MiB after start-up, "
                f"{warm_kib / 1024:.1f} MiB after a 16 MiB warm-up upload",
                flush=True,
            )
            rounds: list[Round] = []
            for number in range(1, args.rounds + 1):
                rounds.append(measure(ports, (sandbox_pid, api_pid), video_mib, sha256, extra))
                print(rounds[-1].line(number), flush=True)
    report(rounds, started_kib, video_mib)


if __name__ == "__main__":
    main()
