"""Two callers on one upstream budget: does one caller's flood hold back the other's jobs?

Issue #20's target: two callers with equal shares, upstream budget 10 calls/s; caller A submits
3,000 jobs as fast as it can (16 threads, each its own official SDK client, default retries,
a 429 that outlasts them waited out and tried again); caller B submits one job a second
meanwhile. B's submissions are answered with p99 <= 1 s, and B's callbacks arrive with
p99 <= 2 s after the upstream finished each job.

The sandbox upstream in a process of its own (50 ms a call, 20 calls/s cap, jobs of 2-3 s),
`relay api` and one `relay worker` as subprocesses at the default settings but the budget,
a callers file with A and B (share 1 each), receivers in a process of their own. `--relay-src
DIR` runs the relay's processes from another checkout (`git archive main | tar -x -C DIR`):
the "before" side of a comparison, in the same run.

    flock /tmp/suite.lock uv run python bench/tenants.py [--jobs 3000] [--relay-src DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import chamelaion
import live

from relay.devtools.embedded_redis import embedded_redis

KEY_A = "bench-caller-a-key-0123456789"
KEY_B = "bench-caller-b-key-0123456789"


@dataclass
class Paced:
    """B: one submission a second, each answer's time noted."""

    ids: list[str] = field(default_factory=list)
    answers: list[float] = field(default_factory=list)  # seconds from call to answer
    refused: int = 0
    errors: list[str] = field(default_factory=list)


def paced(api_url: str, callback_url: str, stop: threading.Event, done: Paced) -> None:
    client = chamelaion.Chamelaion(api_key=KEY_B, base_url=api_url + "/api")
    next_at = time.monotonic()
    while not stop.is_set():
        started = time.monotonic()
        try:
            result = client.lipsync.generate(
                inputs=[{"type": "video", "url": live.VIDEO}, {"type": "audio", "url": live.AUDIO}],
                extra_body={"callback_url": callback_url},
            )
        except chamelaion.RateLimitError:
            done.refused += 1  # after the SDK's own retries: counted, and its time too
            done.answers.append(time.monotonic() - started)
        except chamelaion.APIError as exc:
            done.errors.append(type(exc).__name__)
        else:
            done.answers.append(time.monotonic() - started)
            done.ids.append(result.request_id)
        next_at += 1.0
        stop.wait(max(0.0, next_at - time.monotonic()))
    client.close()


def callers_file(directory: Path) -> Path:
    path = directory / "callers.json"
    path.write_text(
        json.dumps(
            {
                "callers": [
                    {"name": "a", "keys": [KEY_A], "share": 1},
                    {"name": "b", "keys": [KEY_B], "share": 1},
                ]
            }
        )
    )
    return path


def run(jobs: int, relay_src: str | None, label: str) -> None:
    upstream = live.Upstream(latency=0.05, history=0, processing=1.5, spread=1.0)
    print(f"\n== {label}: A floods {jobs:,} jobs, B one a second; {upstream.describe()} ==")
    print(f"   {live.load()} at the start", flush=True)
    with (
        tempfile.TemporaryDirectory(prefix="tenants-") as logs,
        embedded_redis() as redis_url,
        live.sandbox(upstream) as sandbox_url,
        live.receivers(fast=4, hanging=0) as rx,
    ):
        extra = {"RELAY_UPSTREAM_RATE_LIMIT": "10"}
        if relay_src is None or (Path(relay_src) / "relay" / "callers").is_dir():
            extra |= {"RELAY_CALLERS_FILE": str(callers_file(Path(logs))), "RELAY_API_KEYS": ""}
        else:  # a relay from before callers: both keys are one caller
            extra["RELAY_API_KEYS"] = f"{KEY_A},{KEY_B}"
        if relay_src:
            extra["PYTHONPATH"] = relay_src
        with live.relay(redis_url, sandbox_url, Path(logs) / "relay", **extra) as relay:
            flood = live.Callers(relay.api, lambda n: rx.fast[n % 3], 16, key=KEY_A)
            stop = threading.Event()
            b = Paced()
            pacer = threading.Thread(
                target=paced, args=(relay.api, rx.fast[3], stop, b), daemon=True
            )
            cpu_start = relay.cpu()
            flood.start(jobs)
            pacer.start()
            a = flood.join()
            stop.set()
            pacer.join()
            cpu_end = relay.cpu()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                arrived, _ = rx.stats()
                if len(arrived) >= len(a.ids) + len(b.ids):
                    break
                time.sleep(0.5)
            finish = live.finishes(sandbox_url)
            load_end = live.load()
    window = a.last - a.first
    print(
        f"  A: {len(a.ids):,} submitted in {window:.1f} s ({len(a.ids) / window:.1f}/s; "
        f"{a.refused} 429s waited out, {len(a.errors)} errors)"
    )
    print(
        f"  B: {len(b.ids)} submitted, {b.refused} refused after the SDK's retries, "
        f"{len(b.errors)} errors; submit answer {live.spread(b.answers)} (target p99 <= 1 s)"
    )
    lags = [arrived[rid] - finish[rid] for rid in b.ids if rid in arrived and rid in finish]
    a_lags = [arrived[rid] - finish[rid] for rid in a.ids if rid in arrived and rid in finish]
    print(
        f"  B's callbacks after the upstream finished ({len(lags)} of {len(b.ids)}): "
        f"{live.spread(lags)} (target p99 <= 2 s)"
    )
    print(f"  A's callbacks ({len(a_lags)} of {len(a.ids)}): {live.spread(a_lags)}")
    api_cpu, worker_cpu = (e - s for s, e in zip(cpu_start, cpu_end, strict=True))
    print(
        f"  CPU while A submitted: API {api_cpu / window:.0%}, worker {worker_cpu / window:.0%} "
        f"of a core; {load_end} at the end",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--relay-src", help="run the relay from this checkout first (before)")
    args = parser.parse_args()
    if args.relay_src:
        run(args.jobs, args.relay_src, f"before ({args.relay_src})")
    run(args.jobs, None, "after (this checkout)")


if __name__ == "__main__":
    main()
