"""Finding 3 of issue 14, replayed: stalled uploads against status reads and submissions.

Run: uv run python bench/starvation.py [--uploads 205] [--keys 8]

Starts a real redis-server, the sandbox upstream and the API (`relay api`, default settings) as
separate processes. Opens `--uploads` uploads from `--keys` caller keys, each sending its
headers and the first KiB of its video file and then nothing; while they are held, another key
reads a job's status and submits jobs, and the script prints how long each call took, how many
uploads were refused 429 and how many the API runs. Figures on a shared 2-core machine are
noisy; what matters is that the calls do not wait for the uploads.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from forward import BODY, start

from relay.devtools.embedded_redis import embedded_redis
from relay.devtools.ports import free_port

BOUNDARY = "bench-starvation"
VICTIM = "victim-key-0123456789"


def stalled_upload(port: int, key: str) -> socket.socket:
    head = (
        f"POST /api/v1/lipsync/generate-with-media HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"x-api-key: {key}\r\ncontent-type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"content-length: {10**9}\r\n\r\n"
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="video"; filename="v.mp4"\r\n'
        "Content-Type: video/mp4\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(head.encode() + b"\x00" * 1024)
    return sock


def answered_429(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        return sock.recv(64).startswith(b"HTTP/1.1 429")
    except (TimeoutError, OSError):
        return False


def timed(call: httpx.Client, method: str, url: str, body: object = None) -> tuple[float, int]:
    started = time.monotonic()
    response = call.request(method, url, json=body)
    return time.monotonic() - started, response.status_code


def in_progress(api: str) -> str:
    for line in httpx.get(api + "/metrics").text.splitlines():
        if line.startswith("relay_uploads_in_progress "):
            return line.split()[1]
    return "?"


def main(uploads: int, keys: int) -> None:
    sandbox_port, api_port = free_port(), free_port()
    attackers = [f"attacker-{n}-key-0123456789" for n in range(keys)]
    with embedded_redis(avoid=(sandbox_port, api_port)) as redis_url:
        env = {
            **os.environ,
            "CHAMELAION_BASE_URL": f"http://127.0.0.1:{sandbox_port}/api",
            "CHAMELAION_API_KEY": "sandbox-key",
            "RELAY_REDIS_URL": redis_url,
            "RELAY_API_KEYS": ",".join([VICTIM, *attackers]),
            "RELAY_LOG_FORMAT": "json",
        }
        relay = [sys.executable, "-m", "relay.cli"]
        sandbox_health = f"http://127.0.0.1:{sandbox_port}/api/health"
        procs = [start([*relay, "sandbox", "--port", str(sandbox_port)], env, sandbox_health)]
        api_health = f"http://127.0.0.1:{api_port}/healthz"
        procs.append(start([*relay, "api", "--port", str(api_port)], env, api_health))
        api = f"http://127.0.0.1:{api_port}"
        socks: list[socket.socket] = []
        try:
            with httpx.Client(headers={"x-api-key": VICTIM}, timeout=60) as client:
                request_id = client.post(api + "/api/v1/lipsync/generate", json=BODY).json()[
                    "request_id"
                ]
                opened = time.monotonic()
                socks = [stalled_upload(api_port, attackers[n % keys]) for n in range(uploads)]
                time.sleep(1.0)
                refused = sum(answered_429(sock) for sock in socks)
                print(
                    f"{uploads} stalled uploads from {keys} keys: {refused} answered 429, "
                    f"{in_progress(api)} running (opened in {time.monotonic() - opened:.1f} s)"
                )
                for label, method, path, body in (
                    ("GET status (untracked id, proxied)", "GET", "/requests/unknown-id", None),
                    ("GET status (tracked)", "GET", f"/requests/{request_id}", None),
                    ("POST generate", "POST", "/generate", BODY),
                ):
                    samples = [
                        timed(client, method, f"{api}/api/v1/lipsync{path}", body)
                        for _ in range(20)
                    ]
                    seconds = [s for s, _ in samples]
                    statuses = sorted({status for _, status in samples})
                    print(
                        f"{label:<36} while held: median {statistics.median(seconds) * 1000:.1f}"
                        f" ms, max {max(seconds) * 1000:.1f} ms, statuses {statuses}"
                    )
        finally:
            for sock in socks:
                sock.close()
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=30)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--uploads", type=int, default=205)
    parser.add_argument("--keys", type=int, default=8)
    args = parser.parse_args()
    main(args.uploads, args.keys)
