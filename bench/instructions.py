"""What tracing costs a submission in instructions: `relay api` with tracing off and on, each
under valgrind's callgrind, the same submissions to each.

Run: uv run python bench/instructions.py [--submissions 1000] [--warm 500]
(needs valgrind: apt-get install -y valgrind)

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
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from relay.devtools.embedded_redis import embedded_redis
from relay.devtools.ports import free_port

BENCH = Path(__file__).parent
sys.path.insert(0, str(BENCH))
from forward import BODY, KEY, start, untraced_env  # noqa: E402  (forward.py's own)

CALLER = {
    "x-api-key": KEY,
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
}
GENERATE = "/api/v1/lipsync/generate"
BATCH = 512  # the batch processor's default (OTEL_BSP_MAX_EXPORT_BATCH_SIZE)


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
            *("valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes"),
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
    by_thread = totals(prefix)
    per = {thread: value // count for thread, value in by_thread.items() if value}
    print(
        f"tracing {name}: {sum(per.values()):,} instructions per submission "
        f"(by thread: {json.dumps(per)}; {count:,} submissions in {took:.0f} s; "
        f"received in the window: {spans:,} spans in {exports} exports)",
        flush=True,
    )
    if exports > spans // BATCH + 3:
        print("  more exports than 512-span batches and the 5 s delay call for", flush=True)
    return per


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submissions", type=int, default=1000)
    parser.add_argument("--warm", type=int, default=500)
    args = parser.parse_args()
    sandbox_port, sink_port = free_port(), free_port()
    with (
        embedded_redis(avoid=(sandbox_port, sink_port)) as redis_url,
        tempfile.TemporaryDirectory() as tmp,
    ):
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
            out = Path(tmp)
            off = measure("off", env, sink, args.submissions, args.warm, out)
            traced = {
                **env,
                "OTEL_EXPORTER_OTLP_ENDPOINT": sink,
                "OTEL_EXPORTER_OTLP_TIMEOUT": "600",  # no retries of exports valgrind slows
            }
            on = measure("on", traced, sink, args.submissions, args.warm, out)
        finally:
            for helper in helpers:
                helper.terminate()
                helper.wait()
    off_all, on_all = sum(off.values()), sum(on.values())
    loop = on.get("01", 0) - off.get("01", 0)
    print(
        f"tracing's cost: {on_all - off_all:+,} instructions per submission "
        f"({loop:+,} on the event loop's thread, {on_all - on.get('01', 0):+,} on others); "
        f"on/off = {on_all / off_all:.3f}"
    )


if __name__ == "__main__":
    main()
