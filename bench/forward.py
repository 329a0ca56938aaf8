"""Submit throughput: the relay against a bare forwarder, in one run, to the same upstream.

Run: uv run python bench/forward.py [--seconds 5] [--rounds 2] [--connections 32]
     [--tracing [--together] [--fresh]] [--no-pin]
(needs `wrk`: apt-get install -y wrk)

`--tracing`: the relay with tracing off against the relay with tracing on (OTLP/HTTP to a local
receiver, bench/otlp_sink.py, in a process of its own), instead of against the bare forwarder;
every request then carries a caller's `traceparent`, to both. Target: on/off >= 0.9. With
`--together`, each round drives both at once (a wrk each) instead of one after the other: on a
machine other work shares, both then bear the same load. With `--fresh`, both APIs are started
anew for every round: one process can be several per cent faster or slower than another of the
same code for its whole life (seen as runs whose every round agreed, and disagreed with the
next run's), so the median is over as many processes as rounds.

Starts a real redis-server, the sandbox upstream (`relay sandbox`), the API (`relay api`) and a
bare forwarder as separate processes. The bare forwarder is the floor the relay is held to: a
Starlette app under the same uvicorn settings, on the same httpx aiohttp transport, that passes
the body to the same upstream and its answer back, and does nothing else (no validation, no
callback URL check, no Redis); it is sent the body the relay forwards (without `callback_url`),
so the upstream does the same work for both. wrk drives each in turn, alternating for
`--rounds` rounds, at `--connections` concurrent connections; the figures printed are per
round, then the medians and their ratio, and each server's CPU time per request (steadier than
requests per second when other work shares the machine). Also: reads of a tracked job's
status, and submissions with `Prefer: wait=0` (what honouring the preference costs, without
the wait: issue #21's target is within 5 % of plain submissions). The server under test runs
on a core of its own and everything else on the others (`--no-pin`: all share every core), so
its rate is what its own CPU per request allows; on a 2-core machine the rest shares one core,
so figures are a floor, not a ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from relay.devtools.embedded_redis import embedded_redis
from relay.devtools.ports import free_port

BODY = {
    "inputs": [
        {"type": "video", "url": "https://cdn.example.com/v.mp4"},
        {"type": "audio", "url": "https://cdn.example.com/a.wav"},
    ],
    "callback_url": "http://10.0.0.1/hook",
}
# What the relay forwards of BODY, which the bare forwarder passes on as it is.
UPSTREAM_BODY = {"inputs": BODY["inputs"]}
KEY = "bench-key-0123456789"


def serve_bare(port: int, upstream: str) -> None:
    """The bare forwarder: body in, same body to the upstream, its answer out."""
    from collections.abc import AsyncIterator
    from contextlib import asynccontextmanager

    import uvicorn
    from httpx_aiohttp import AiohttpTransport
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    client = httpx.AsyncClient(
        base_url=upstream,
        headers={"x-api-key": "sandbox-key"},
        transport=AiohttpTransport(limits=httpx.Limits(max_connections=200)),
        timeout=30,
    )

    async def generate(request: Request) -> Response:
        body = await request.body()
        answer = await client.post(
            "v1/lipsync/generate", content=body, headers={"content-type": "application/json"}
        )
        return Response(answer.content, answer.status_code, media_type="application/json")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = Starlette(
        routes=[Route("/api/v1/lipsync/generate", generate, methods=["POST"])], lifespan=lifespan
    )
    uvicorn.run(app, host="127.0.0.1", port=port, access_log=False, log_config=None)


# The servers under test (the relay's API, the bare forwarder) run on a core of their own, and
# everything else (wrk, the sandbox, Redis, the OTLP receiver, this script) on the others: on
# two cores, five busy processes sharing both made a server's CPU per request swing by half
# from one round to the next, and its rate follow whatever else ran. `--no-pin` shares them.
_CPUS = sorted(os.sched_getaffinity(0))
SERVER_CPUS = {_CPUS[-1]}
OTHER_CPUS = set(_CPUS[:-1]) or SERVER_CPUS
pinning = len(_CPUS) >= 2


def pin_rest() -> None:
    """This script, and what it starts from now on but the servers under test, off their core."""
    if pinning:
        os.sched_setaffinity(0, OTHER_CPUS)


def start(
    command: list[str],
    env: dict[str, str],
    health: str,
    *,
    within: float = 20.0,
    answer: float = 0.5,
    under_test: bool = False,
) -> subprocess.Popen[bytes]:
    """Start `command` (on the servers' core when `under_test`) and wait up to `within`
    seconds for `health` to answer (each check given `answer` seconds)."""
    cpus = SERVER_CPUS if under_test and pinning else None
    proc = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # Set in the child before it runs anything, so each of its threads has it.
        preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
    )
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            httpx.get(health, timeout=answer)
            return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{command} did not start")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU time so far of a process's main thread (its event loop) and of its other threads (a
    traced API's span exporter), to the nanosecond (the scheduler's count, where /proc/PID/stat
    counts clock ticks of 10 ms)."""
    loop = other = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            ran = int((task / "schedstat").read_text().split()[0]) / 1e9
        except FileNotFoundError:  # a thread that just ended
            continue
        if task.name == str(pid):
            loop += ran
        else:
            other += ran
    return loop, other


def wrk(
    url: str,
    method: str,
    seconds: float,
    connections: int,
    script_dir: Path,
    payload: object,
    headers: dict[str, str] | None = None,
) -> float:
    """Requests per second with a 2xx answer (wrk counts others as errors: any is fatal here)."""
    script = script_dir / f"{method}.lua"
    body = json.dumps(payload).replace("\\", "\\\\").replace('"', '\\"')
    script.write_text(
        f'wrk.method = "{method}"\n'
        f'wrk.headers["x-api-key"] = "{KEY}"\n'
        + "".join(f'wrk.headers["{name}"] = "{value}"\n' for name, value in (headers or {}).items())
        + (
            f'wrk.headers["content-type"] = "application/json"\nwrk.body = "{body}"\n'
            if method == "POST"
            else ""
        )
    )
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{round(seconds)}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors against {url}:\n{out}")
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert match, out
    return float(match.group(1))


def callers_file(directory: Path, count: int) -> Path:
    """A callers file of `count` callers with two keys each, the bench's key the last one's."""
    keys = [[f"bench-caller-{n}-key-{k}-0123456789" for k in (1, 2)] for n in range(count)]
    keys[-1][-1] = KEY
    callers = [{"name": f"caller-{n}", "keys": pair} for n, pair in enumerate(keys)]
    path = directory / "callers.json"
    path.write_text(json.dumps({"callers": callers}))
    return path


def main(seconds: float, rounds: int, connections: int, callers: int = 0) -> None:
    if callers:
        compare_callers(seconds, rounds, connections, callers)
        return
    sandbox_port, api_port, bare_port = free_port(), free_port(), free_port()
    with (
        embedded_redis(avoid=(sandbox_port, api_port, bare_port)) as redis_url,
        tempfile.TemporaryDirectory() as tmp,
    ):
        upstream = f"http://127.0.0.1:{sandbox_port}/api"
        env = untraced_env(upstream, redis_url)
        cli = [sys.executable, "-m", "relay.cli"]
        procs = [start([*cli, "sandbox", "--port", str(sandbox_port)], env, upstream + "/health")]
        try:
            api = f"http://127.0.0.1:{api_port}"
            bare = f"http://127.0.0.1:{bare_port}"
            procs.append(
                start(
                    [*cli, "api", "--port", str(api_port)], env, api + "/healthz", under_test=True
                )
            )
            procs.append(
                start(
                    [sys.executable, __file__, "--serve-bare", str(bare_port), upstream],
                    env,
                    bare + "/",
                    under_test=True,
                )
            )
            generate = "/api/v1/lipsync/generate"
            first = httpx.post(api + generate, json=BODY, headers={"x-api-key": KEY})
            request_id = first.json()["request_id"]
            api_rss = rss_mib(procs[1].pid)
            relay_rates: list[float] = []
            wait_rates: list[float] = []
            bare_rates: list[float] = []
            cpu: dict[str, list[float]] = {"relay": [], "wait": [], "bare": []}
            # `Prefer: wait=0`: everything honouring the preference costs (the header, a read
            # of the new job, the answer with it) but the wait itself.
            prefer = {"Prefer": "wait=0"}
            for n in range(1, rounds + 1):
                relay_runs = [
                    ("relay", api, BODY, relay_rates, procs[1], None),
                    ("wait", api, BODY, wait_rates, procs[1], prefer),
                ]
                # Against drift over the run (the machine's other work): plain and waiting
                # take turns going first.
                if n % 2 == 0:
                    relay_runs.reverse()
                for name, url, payload, rates, proc, headers in (
                    *relay_runs,
                    ("bare", bare, UPSTREAM_BODY, bare_rates, procs[2], None),
                ):
                    used = cpu_seconds(proc.pid)
                    profiler = None
                    if os.environ.get("FORWARD_PROFILE") and name == "relay" and n == 1:
                        profiler = subprocess.Popen(
                            [
                                "py-spy",
                                "record",
                                "-p",
                                str(proc.pid),
                                "-d",
                                str(round(seconds)),
                                "-r",
                                "250",
                                "-f",
                                "raw",
                                "-o",
                                os.environ["FORWARD_PROFILE"],
                            ],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                        )
                    rates.append(
                        wrk(
                            url + generate,
                            "POST",
                            seconds,
                            connections,
                            Path(tmp),
                            payload,
                            headers,
                        )
                    )
                    # CPU per request: steadier than req/s when other work shares the cores.
                    cpu[name].append((cpu_seconds(proc.pid) - used) / (rates[-1] * seconds))
                    if profiler is not None:
                        profiler.wait()
                print(
                    f"round {n}: relay {relay_rates[-1]:,.0f} req/s "
                    f"({cpu['relay'][-1] * 1e6:,.0f} us CPU each), bare forwarder "
                    f"{bare_rates[-1]:,.0f} req/s ({cpu['bare'][-1] * 1e6:,.0f} us CPU each), "
                    f"ratio {relay_rates[-1] / bare_rates[-1]:.2f}; relay with Prefer: wait=0 "
                    f"{wait_rates[-1]:,.0f} req/s ({cpu['wait'][-1] * 1e6:,.0f} us CPU each)"
                )
            relay_rate, bare_rate = statistics.median(relay_rates), statistics.median(bare_rates)
            print(
                f"POST generate at {connections} connections (median of {rounds}): relay "
                f"{relay_rate:,.0f} req/s, bare forwarder {bare_rate:,.0f} req/s, "
                f"relay/bare = {relay_rate / bare_rate:.2f} (target >= 0.8)"
            )
            wait_rate = statistics.median(wait_rates)
            # Each round's plain and waiting runs are back to back, first one then the other
            # in turn: their ratio cancels the drift as other work on the machine comes and
            # goes, which the ratio of the medians does not.
            paired = statistics.median(w / r for w, r in zip(wait_rates, relay_rates, strict=True))
            wait_cpu = statistics.median(cpu["wait"])
            print(
                f"POST generate with Prefer: wait=0 (median of {rounds}): {wait_rate:,.0f} req/s, "
                f"{wait_rate / relay_rate:.2f} of the relay without it; median of the rounds' "
                f"wait/plain {paired:.2f} (target >= 0.95); CPU each {wait_cpu * 1e6:,.0f} us, "
                f"plain/wait = {statistics.median(cpu['relay']) / wait_cpu:.2f}"
            )
            relay_cpu, bare_cpu = statistics.median(cpu["relay"]), statistics.median(cpu["bare"])
            print(
                f"server CPU per request (median): relay {relay_cpu * 1e6:,.0f} us, bare "
                f"{bare_cpu * 1e6:,.0f} us, bare/relay = {bare_cpu / relay_cpu:.2f}"
            )
            status = wrk(
                f"{api}/api/v1/lipsync/requests/{request_id}",
                "GET",
                seconds,
                connections,
                Path(tmp),
                None,
            )
            print(f"GET tracked status at {connections} connections: {status:,.0f} req/s")
            submitted = sum(relay_rates) * seconds
            print(
                f"API RSS: {api_rss:.1f} MiB after one submission, {rss_mib(procs[1].pid):.1f} "
                f"MiB after ~{submitted:,.0f} more and the status reads"
            )
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)


def compare_callers(seconds: float, rounds: int, connections: int, count: int) -> None:
    """Submit CPU of the API with RELAY_API_KEYS (one caller) against the same API with a
    callers file of `count` callers (every key of every caller compared for each request),
    alternating, in one run: what authorization by a callers file adds."""
    sandbox_port, keys_port, file_port = free_port(), free_port(), free_port()
    with (
        embedded_redis(avoid=(sandbox_port, keys_port, file_port)) as redis_url,
        tempfile.TemporaryDirectory() as tmp,
    ):
        upstream = f"http://127.0.0.1:{sandbox_port}/api"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RELAY_")},
            "CHAMELAION_BASE_URL": upstream,
            "CHAMELAION_API_KEY": "sandbox-key",
            "RELAY_REDIS_URL": redis_url,
            "RELAY_LOG_FORMAT": "json",
            "RELAY_UPSTREAM_RATE_LIMIT": "1000000",
        }
        by_file = {**env, "RELAY_CALLERS_FILE": str(callers_file(Path(tmp), count))}
        cli = [sys.executable, "-m", "relay.cli"]
        procs = [start([*cli, "sandbox", "--port", str(sandbox_port)], env, upstream + "/health")]
        try:
            servers = {}
            for name, port, server_env in (
                ("RELAY_API_KEYS", keys_port, {**env, "RELAY_API_KEYS": KEY}),
                (f"callers file ({count} callers)", file_port, by_file),
            ):
                url = f"http://127.0.0.1:{port}"
                proc = start(
                    [*cli, "api", "--port", str(port)],
                    server_env,
                    url + "/healthz",
                    under_test=True,
                )
                procs.append(proc)
                servers[name] = (url, proc)
            cpu: dict[str, list[float]] = {name: [] for name in servers}
            for n in range(1, rounds + 1):
                line = []
                for name, (url, proc) in servers.items():
                    used = cpu_seconds(proc.pid)
                    rate = wrk(
                        url + "/api/v1/lipsync/generate",
                        "POST",
                        seconds,
                        connections,
                        Path(tmp),
                        BODY,
                    )
                    cpu[name].append((cpu_seconds(proc.pid) - used) / (rate * seconds))
                    line.append(
                        f"{name} {rate:,.0f} req/s ({cpu[name][-1] * 1e6:,.0f} us CPU each)"
                    )
                print(f"round {n}: " + "; ".join(line), flush=True)
            keys_cpu, file_cpu = (statistics.median(values) for values in cpu.values())
            print(
                f"API CPU per submission (median of {rounds}): RELAY_API_KEYS "
                f"{keys_cpu * 1e6:,.0f} us, callers file {file_cpu * 1e6:,.0f} us: "
                f"{file_cpu / keys_cpu - 1:+.1%} (target <= +5 %)"
            )
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)


def untraced_env(upstream: str, redis_url: str) -> dict[str, str]:
    """An API's environment for this bench's runs and instructions.py's: the sandbox upstream,
    one key, no upstream budget in the way, and no OTEL_ variable, so that tracing is on only
    where a bench sets them."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "OTEL_"))},
        "CHAMELAION_BASE_URL": upstream,
        "CHAMELAION_API_KEY": "sandbox-key",
        "RELAY_REDIS_URL": redis_url,
        "RELAY_API_KEYS": KEY,
        "RELAY_LOG_FORMAT": "json",
        # The bare forwarder has no upstream budget: the relay's is raised out of the way
        # (taking a slot still costs its Redis round trip, which is measured).
        "RELAY_UPSTREAM_RATE_LIMIT": "1000000",
    }


def main_tracing(
    seconds: float, rounds: int, connections: int, together: bool, fresh: bool
) -> None:
    """The relay with tracing off against the relay with tracing on, in alternating rounds or
    (`together`) driven at the same time."""
    sandbox_port, off_port, on_port, sink_port = (free_port() for _ in range(4))
    with (
        embedded_redis(avoid=(sandbox_port, off_port, on_port, sink_port)) as redis_url,
        tempfile.TemporaryDirectory() as tmp,
    ):
        upstream = f"http://127.0.0.1:{sandbox_port}/api"
        sink = f"http://127.0.0.1:{sink_port}"
        env = untraced_env(upstream, redis_url)
        for name in ("off", "on"):
            Path(tmp, name).mkdir()  # each wrk's script, when both run at once
        # The batch processor's defaults (OTEL_BSP_*): full batches of 512 spans, the last
        # spans of a round in the next round's first.
        traced = {**env, "OTEL_EXPORTER_OTLP_ENDPOINT": sink}
        cli = [sys.executable, "-m", "relay.cli"]
        bench_dir = Path(__file__).parent
        procs = [
            start([*cli, "sandbox", "--port", str(sandbox_port)], env, upstream + "/health"),
            start([sys.executable, str(bench_dir / "otlp_sink.py"), str(sink_port)], env, sink),
        ]

        def start_apis(off_port: int, on_port: int) -> tuple[str, str]:
            """The two APIs (procs[2] untraced, procs[3] traced), and their URLs."""
            urls = []
            for n, (port, api_env) in enumerate(((off_port, env), (on_port, traced)), start=2):
                url = f"http://127.0.0.1:{port}"
                api_cmd = [*cli, "api", "--port", str(port)]
                proc = start(api_cmd, api_env, url + "/healthz", under_test=True)
                procs[n : n + 1] = [proc]
                urls.append(url)
            return urls[0], urls[1]

        try:
            off, on = start_apis(off_port, on_port)
            generate = "/api/v1/lipsync/generate"
            # A caller that traces: both relays get its traceparent (the untraced one ignores it).
            caller = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
            rates: dict[str, list[float]] = {"off": [], "on": []}
            cpu: dict[str, list[float]] = {"off": [], "on": []}
            # The traced API's CPU per submission outside its event loop (the exporter's
            # thread), and the receiver's: it shares the machine's cores with the API.
            threads: list[float] = []
            sink_cpu: list[float] = []
            servers = {"off": procs[2].pid, "on": procs[3].pid, "sink": procs[1].pid}
            for n in range(1, rounds + 1):
                if fresh and n > 1:
                    # New processes: one can be several per cent faster or slower than another
                    # of the same code for its whole life, so each round draws its two anew.
                    for proc in procs[2:]:
                        proc.send_signal(signal.SIGTERM)
                        proc.wait(timeout=30)
                    off, on = start_apis(free_port(), free_port())
                    servers.update(off=procs[2].pid, on=procs[3].pid)
                # Each process's CPU over the whole round pair (the traced API exports while
                # the other is driven too), per request it served.
                before = {name: thread_cpu_seconds(pid) for name, pid in servers.items()}
                if together:
                    # Both driven at once, each by its own wrk: whatever else the machine runs
                    # weighs on both alike.
                    with ThreadPoolExecutor(2) as pool:
                        running = {
                            name: pool.submit(
                                wrk,
                                url + generate,
                                "POST",
                                seconds,
                                connections,
                                Path(tmp, name),
                                BODY,
                                caller,
                            )
                            for name, url in (("off", off), ("on", on))
                        }
                    for name, done in running.items():
                        rates[name].append(done.result())
                for name, url in () if together else (("off", off), ("on", on)):
                    profiler = None
                    if os.environ.get("FORWARD_PROFILE") and n == 1:
                        # py-spy's raw stacks of this API, one file per mode.
                        out = f"{os.environ['FORWARD_PROFILE']}.{name}"
                        profiler = subprocess.Popen(
                            [
                                *("py-spy", "record", "-p", str(servers[name])),
                                *("-d", str(round(seconds)), "-r", "250", "-f", "raw", "-o", out),
                            ],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                        )
                    rate = wrk(
                        url + generate, "POST", seconds, connections, Path(tmp), BODY, caller
                    )
                    rates[name].append(rate)
                    if profiler is not None:
                        profiler.wait()
                after = {name: thread_cpu_seconds(pid) for name, pid in servers.items()}
                used = {
                    name: [
                        end - start for end, start in zip(after[name], before[name], strict=True)
                    ]
                    for name in servers
                }
                for name in ("off", "on"):
                    cpu[name].append(sum(used[name]) / (rates[name][-1] * seconds))
                threads.append(used["on"][1] / (rates["on"][-1] * seconds))
                sink_cpu.append(sum(used["sink"]) / (rates["on"][-1] * seconds))
                print(
                    f"round {n}: tracing off {rates['off'][-1]:,.0f} req/s "
                    f"({cpu['off'][-1] * 1e6:,.0f} us CPU each), on {rates['on'][-1]:,.0f} req/s "
                    f"({cpu['on'][-1] * 1e6:,.0f} us CPU each, {threads[-1] * 1e6:,.0f} of them "
                    f"outside the loop; receiver {sink_cpu[-1] * 1e6:,.0f} us), "
                    f"on/off {rates['on'][-1] / rates['off'][-1]:.2f}",
                    flush=True,
                )
            rate_off, rate_on = statistics.median(rates["off"]), statistics.median(rates["on"])
            cpu_off, cpu_on = statistics.median(cpu["off"]), statistics.median(cpu["on"])
            # Each round's pair ran back to back: their ratio is steadier than the medians'
            # when other work comes and goes on the machine.
            pairs = zip(rates["on"], rates["off"], strict=True)
            paired = statistics.median(on / off for on, off in pairs)
            print(
                f"POST generate at {connections} connections (median of {rounds}): tracing off "
                f"{rate_off:,.0f} req/s, on {rate_on:,.0f} req/s, on/off = "
                f"{rate_on / rate_off:.2f}; median of the rounds' on/off {paired:.2f} "
                "(target >= 0.9)"
            )
            print(
                f"API CPU per request (median): off {cpu_off * 1e6:,.0f} us, on "
                f"{cpu_on * 1e6:,.0f} us ({statistics.median(threads) * 1e6:,.0f} us outside "
                f"the event loop), on/off = {cpu_on / cpu_off:.2f}; the OTLP receiver "
                f"{statistics.median(sink_cpu) * 1e6:,.0f} us per traced request"
            )
            # What the traced relay exported, once its last batch is out (at its exit).
            procs[3].send_signal(signal.SIGTERM)
            procs[3].wait(timeout=30)
            got = httpx.get(sink + "/count").json()
            made = sum(rates["on"]) * seconds
            print(
                f"OTLP receiver: {got['spans']:,} spans in {got['exports']:,} exports for "
                f"~{made:,.0f} traced submissions (2 spans each: the submission and its create)"
            )
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=30)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-bare":
        serve_bare(int(sys.argv[2]), sys.argv[3])
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--callers",
        type=int,
        default=0,
        help="instead: submit CPU with RELAY_API_KEYS against a callers file of this many",
    )
    parser.add_argument("--tracing", action="store_true", help="tracing off vs on (see above)")
    parser.add_argument(
        "--together", action="store_true", help="with --tracing: drive both at once (see above)"
    )
    parser.add_argument(
        "--fresh", action="store_true", help="with --tracing: new APIs every round (see above)"
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="servers under test share every core (see above)"
    )
    args = parser.parse_args()
    pinning = pinning and not args.no_pin
    pin_rest()
    if args.tracing:
        main_tracing(args.seconds, args.rounds, args.connections, args.together, args.fresh)
    else:
        main(args.seconds, args.rounds, args.connections, args.callers)
