"""What tracing costs a submission in instructions: `relay api` with tracing off and on, each
under valgrind's callgrind, the same submissions to each.

Run: uv run python bench/instructions.py [--submissions 1000] [--warm 500]
     uv run python bench/instructions.py --worker [--jobs 300]
(needs valgrind: apt-get install -y valgrind)

`--worker`: the same for `relay worker` and an ended job, in burst.py's quiet case (its stand-in
upstream and receivers, jobs written straight into the store, each with a submission's trace
context). Per worker: a burst of `--jobs` jobs to warm it, then the burst counted, from the
finish to the last callback and 3 s on (the last export's), divided by `--jobs`.

On a shared 2-core machine a server's CPU per request swings by a fifth from one round to the
next (bench/README.md), several times what tracing costs, so forward.py's rates need many
rounds to say anything. An instruction count does not swing: the same code doing the same
requests executes nearly the same instructions whatever else the machine runs. This counts,
per submission, every instruction of the API process (its event loop's thread and, traced, the
exporter's thread apart), after `--warm` submissions to fill its caches, and divides.

Instructions are not time: a traced API also touches more memory, and wall-clock figures
(forward.py --tracing) stay the target's measure. The count says where tracing's cost is and
whether a change cut it, in one run, without the noise.

Under valgrind a traced API runs some 50 times slower and its threads take turns, so an export
is slow beside the spans that come: the exporter is given a timeout of 600 s
(`OTEL_EXPORTER_OTLP_TIMEOUT`) so that none is retried, and the exports and spans the receiver
got in the measured window are printed (batches of 512, and what is queued every 5 s). It was
such a run that showed the batch processor sending the few spans that came during each export
in an export of their own, over and over (fixed, tests/test_span_batches.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from relay.devtools.embedded_redis import embedded_redis
from relay.devtools.ports import free_port

BENCH = Path(__file__).parent
sys.path.insert(0, str(BENCH))
from burst import Bench, stand_ins, traced_env, worker_env  # noqa: E402  (burst.py's own)
from forward import BODY, KEY, start, untraced_env  # noqa: E402  (forward.py's own)

CALLER = {
    "x-api-key": KEY,
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
}
GENERATE = "/api/v1/lipsync/generate"
BATCH = 512  # the batch processor's default (OTEL_BSP_MAX_EXPORT_BATCH_SIZE)
CALLGRIND = ("valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes")


async def submit(url: str, count: int, concurrency: int = 16) -> None:
    left = count

    async def one_by_one(client: httpx.AsyncClient) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            response = await client.post(GENERATE, json=BODY, headers=CALLER)
            if response.status_code not in (200, 201, 202):
                raise RuntimeError(f"{response.status_code}: {response.text}")

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        await asyncio.gather(*(one_by_one(client) for _ in range(concurrency)))


def control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True)


def totals(dump_prefix: str) -> dict[str, int]:
    """Instructions by thread (callgrind's numbering: 1 is the main thread) in the last dump."""
    found: dict[str, int] = {}
    for path in sorted(Path(dump_prefix).parent.glob(Path(dump_prefix).name + ".*-*")):
        thread = path.name.rsplit("-", 1)[1]
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                found[thread] = int(line.split()[1])
    return found


def measure(
    name: str, env: dict[str, str], sink: str, count: int, warm: int, out: Path
) -> dict[str, int]:
    port = free_port()
    prefix = str(out / name)
    url = f"http://127.0.0.1:{port}"
    # Under valgrind an API takes a minute or so to start, and seconds to answer at first.
    api = start(
        [
            *CALLGRIND,
            f"--callgrind-out-file={prefix}.%p",
            *(sys.executable, "-m", "relay.cli", "api", "--port", str(port)),
        ],
        env,
        url + "/healthz",
        within=300,
        answer=5,
    )
    try:
        asyncio.run(submit(url, warm))
        pid = str(api.pid)
        control("-i", "on", pid)
        asyncio.run(submit(url, 200))  # valgrind translates the code again, instrumented
        control("-z", pid)
        before = httpx.get(sink + "/count").json()
        started = time.monotonic()
        asyncio.run(submit(url, count))
        time.sleep(6)  # past the batch processor's 5 s delay: the last spans go out
        control("-d", pid)
        after = httpx.get(sink + "/count").json()
        exports = after["exports"] - before["exports"]
        spans = after["spans"] - before["spans"]
        took = time.monotonic() - started
    finally:
        api.terminate()
        api.wait(120)
    if exports > spans // BATCH + 3:
        print("  more exports than 512-span batches and the 5 s delay call for", flush=True)
    return report(name, totals(prefix), count, "submission", took, spans, exports)


def report(
    name: str,
    by_thread: dict[str, int],
    count: int,
    unit: str,
    took: float,
    spans: int,
    exports: int,
) -> dict[str, int]:
    per = {thread: value // count for thread, value in by_thread.items() if value}
    print(
        f"tracing {name}: {sum(per.values()):,} instructions per {unit} "
        f"(by thread: {json.dumps(per)}; {count:,} {unit}s in {took:.0f} s; "
        f"received in the window: {spans:,} spans in {exports} exports)",
        flush=True,
    )
    return per


def burst(bench: Bench, jobs: int, prefix: str, before_finish: Callable[[], None]) -> None:
    """`jobs` jobs polled as processing, then all finished at once (`before_finish` called
    just before), until every callback is in."""
    httpx.post(bench.receivers + "/reset")
    httpx.post(bench.upstream + "/reset")
    ids = list(asyncio.run(bench.create_jobs(jobs, 0, prefix=prefix, flush=False)))
    httpx.post(bench.upstream + "/register", json=ids, timeout=30)
    wait_for(lambda: asyncio.run(bench.polled_all(ids)), 900, "every job polled")
    before_finish()
    httpx.post(bench.upstream + "/finish")

    def all_in() -> bool:
        got = httpx.get(bench.receivers + "/stats", timeout=30).json()["received"]
        return len(got) >= len(ids)

    wait_for(all_in, 1800, "every callback")


def wait_for(done: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not within {within:g} s: {what}")
        time.sleep(0.5)


def measure_worker(
    name: str, env: dict[str, str], sink: str, bench: Bench, jobs: int, out: Path
) -> dict[str, int]:
    port = free_port()
    prefix = str(out / f"worker-{name}")
    worker = start(
        [
            *CALLGRIND,
            f"--callgrind-out-file={prefix}.%p",
            *(sys.executable, "-m", "relay.cli", "worker"),
        ],
        {**env, "RELAY_WORKER_HTTP_PORT": str(port)},
        f"http://127.0.0.1:{port}/healthz",
        within=300,
        answer=5,
    )
    try:
        pid = str(worker.pid)
        control("-i", "on", pid)
        # Every path a burst takes, taken once (lazy imports, connections, caches), counted
        # by nobody: valgrind also translates the code again, instrumented.
        burst(bench, jobs, f"warm-{name}-", lambda: None)
        before: dict[str, float] = {}

        def zero() -> None:
            control("-z", pid)
            before.update(httpx.get(sink + "/count").json(), started=time.monotonic())

        burst(bench, jobs, f"{name}-", zero)
        time.sleep(3)  # past the 250 ms batch delay, valgrind's pace included
        control("-d", pid)
        after = httpx.get(sink + "/count").json()
        took = time.monotonic() - before["started"]
    finally:
        worker.terminate()
        worker.wait(120)
    spans = after["spans"] - int(before["spans"])
    exports = after["exports"] - int(before["exports"])
    if spans:
        print(
            f"  spans by name over both bursts: {after['names']}; links in the window: "
            f"{after['links'] - int(before['links']):,}",
            flush=True,
        )
    return report(name, totals(prefix), jobs, "ended job", took, spans, exports)


def compare(off: dict[str, int], on: dict[str, int], unit: str) -> None:
    off_all, on_all = sum(off.values()), sum(on.values())
    loop = on.get("01", 0) - off.get("01", 0)
    print(
        f"tracing's cost: {on_all - off_all:+,} instructions per {unit} "
        f"({loop:+,} on the event loop's thread, {on_all - on.get('01', 0):+,} on others); "
        f"on/off = {on_all / off_all:.3f}"
    )


def main_worker(jobs: int, out: Path, extra: dict[str, str]) -> None:
    sink_port = free_port()
    sink = f"http://127.0.0.1:{sink_port}"
    with stand_ins(hang=10.0) as bench:
        bench.traced = True  # every job carries a submission's context, traced worker or not
        env = worker_env(bench.upstream, bench.redis_url, 10.0, [])
        sink_proc = start(
            [sys.executable, str(BENCH / "otlp_sink.py"), str(sink_port)], env, sink + "/count"
        )
        try:
            off = measure_worker("off", env, sink, bench, jobs, out)
            traced = {**traced_env(env, sink), "OTEL_EXPORTER_OTLP_TIMEOUT": "600", **extra}
            on = measure_worker("on", traced, sink, bench, jobs, out)
        finally:
            sink_proc.terminate()
            sink_proc.wait()
    compare(off, on, "ended job")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submissions", type=int, default=1000)
    parser.add_argument("--warm", type=int, default=500)
    parser.add_argument("--worker", action="store_true", help="relay worker, an ended job")
    parser.add_argument("--jobs", type=int, default=300, help="with --worker: jobs a burst")
    parser.add_argument("--keep", default="", help="keep callgrind's files in this directory")
    parser.add_argument(
        "--env", action="append", default=[], help="VAR=value for the traced process"
    )
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.env)
    with contextlib.ExitStack() as stack:
        out = Path(args.keep or stack.enter_context(tempfile.TemporaryDirectory()))
        out.mkdir(parents=True, exist_ok=True)
        if args.worker:
            main_worker(args.jobs, out, extra)
        else:
            main_api(args.submissions, args.warm, out, extra)


def main_api(submissions: int, warm: int, out: Path, extra: dict[str, str]) -> None:
    sandbox_port, sink_port = free_port(), free_port()
    with embedded_redis(avoid=(sandbox_port, sink_port)) as redis_url:
        upstream = f"http://127.0.0.1:{sandbox_port}/api"
        sink = f"http://127.0.0.1:{sink_port}"
        env = untraced_env(upstream, redis_url)
        helpers: list[subprocess.Popen[bytes]] = []
        try:
            cli = [sys.executable, "-m", "relay.cli"]
            helpers.append(
                start([*cli, "sandbox", "--port", str(sandbox_port)], env, upstream + "/health")
            )
            sink_command = [sys.executable, str(BENCH / "otlp_sink.py"), str(sink_port)]
            helpers.append(start(sink_command, env, sink + "/count"))
            off = measure("off", env, sink, submissions, warm, out)
            traced = {
                **env,
                "OTEL_EXPORTER_OTLP_ENDPOINT": sink,
                "OTEL_EXPORTER_OTLP_TIMEOUT": "600",  # no retries of exports valgrind slows
                **extra,
            }
            on = measure("on", traced, sink, submissions, warm, out)
        finally:
            for helper in helpers:
                helper.terminate()
                helper.wait()
    compare(off, on, "submission")


if __name__ == "__main__":
    main()
