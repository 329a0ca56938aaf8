"""What tracing costs a submission, in isolation: the API's own submission span (relay.api.traced,
around a Starlette request carrying a caller's traceparent), the upstream create's child span
(as relay.upstream makes it) and the job's kept context (relay.api.submit), ended and exported
to a local OTLP receiver (bench/otlp_sink.py, its own process) by the relay's exporter.

Run: uv run python bench/tracing_cost.py [--submissions 20000] [--rate 1000] [--rounds 3]

The process first loads what an API process does (the app's modules), so the garbage
collector walks a heap of the API's size. The requests are paced (`--rate` a second, in bursts
of 50, the loop idle in between as a server's is), so the batch processor exports as it would
behind a busy API. Printed: the CPU per
submission of the event loop's thread and of the exporter's thread (the scheduler's count, from
/proc), with tracing on, less the same loop with tracing off; the median of `--rounds`. The
forward bench (`forward.py --tracing`) measures the whole API; this one says where its tracing
µs go, with little of the noise a shared machine adds to a whole-API run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BURST = 50
ROUTE = "/api/v1/lipsync/generate"
UPSTREAM_URL = "http://127.0.0.1:8000/api/v1/lipsync/generate"
HEADERS = [
    (b"host", b"relay.example"),
    (b"content-type", b"application/json"),
    (b"x-api-key", b"bench-key-0123456789"),
    (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
]


def thread_cpu() -> tuple[float, float]:
    """This process's CPU so far (µs): its main thread's, and its other threads'."""
    me = os.getpid()
    loop = other = 0.0
    for task in Path(f"/proc/{me}/task").iterdir():
        try:
            ran = int((task / "schedstat").read_text().split()[0]) / 1e3
        except FileNotFoundError:
            continue
        if task.name == str(me):
            loop += ran
        else:
            other += ran
    return loop, other


async def submissions(count: int, rate: float) -> None:
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind
    from starlette.requests import Request
    from starlette.responses import Response

    from relay.api.traced import traced
    from relay.tracing import setup, spans

    async def create(request: Request) -> Response:
        # relay.upstream's span around the create, and relay.api.submit's kept context.
        tracer = setup.active()
        if tracer is not None and current_span().is_recording():
            span = tracer.start_span(
                "POST",
                kind=SpanKind.CLIENT,
                attributes={
                    "http.request.method": "POST",
                    "server.address": "127.0.0.1",
                    "server.port": 8000,
                    "url.full": UPSTREAM_URL,
                },
            )
            span.set_attribute("http.response.status_code", 200)
            span.end()
            # The job's kept context: the tracer's (since relay.tracing.tracer.Tracer.keep),
            # or a checkout's spans.keep before it.
            tracer.keep() if hasattr(tracer, "keep") else spans.keep()
        return Response(status_code=200)

    # The submission's span as relay.upstream finds it (a checkout before spans.current_span:
    # OpenTelemetry's current span).
    current_span = getattr(spans, "current_span", trace.get_current_span)
    endpoint = traced(create, ROUTE)
    scope = {
        "type": "http",
        "method": "POST",
        "path": ROUTE,
        "scheme": "http",
        "headers": HEADERS,
        "query_string": b"",
    }
    pause = BURST / rate
    for n in range(count):
        await endpoint(Request(scope))
        if n % BURST == BURST - 1:
            await asyncio.sleep(pause)


def measure(count: int, rate: float, traced: bool) -> tuple[float, float]:
    """CPU per submission (µs) of the loop and of the other threads."""
    from relay.tracing import setup

    if traced:
        assert setup.start("api")
    tracer = setup.active()
    before = thread_cpu()
    asyncio.run(submissions(count, rate))
    if tracer is not None:
        tracer.processor.force_flush()  # the last batch too, from the exporter's thread
    after = thread_cpu()
    setup.stop()
    return (after[0] - before[0]) / count, (after[1] - before[1]) / count


def main(count: int, rate: float, rounds: int) -> None:
    # What an API process holds (the app's modules, ~80,000 objects the collector tracks), so
    # that a collection, which spans waiting for their export make more of, costs what it
    # does there.
    import relay.api.app
    import relay.serving  # noqa: F401
    from relay.devtools.ports import free_port

    port = free_port()
    sink = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "otlp_sink.py"), str(port)],
        stdout=subprocess.DEVNULL,
    )
    try:
        time.sleep(2)  # the receiver is up well before the first batch
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{port}"
        off_loop, on_loop, on_thread = [], [], []
        for n in range(1, rounds + 1):
            loop_off, _ = measure(count, rate, traced=False)
            loop_on, thread_on = measure(count, rate, traced=True)
            off_loop.append(loop_off)
            on_loop.append(loop_on)
            on_thread.append(thread_on)
            print(
                f"round {n}: loop {loop_off:.1f} us off, {loop_on:.1f} us on; exporter thread "
                f"{thread_on:.1f} us (per submission)",
                flush=True,
            )
        loop = statistics.median(on - off for on, off in zip(on_loop, off_loop, strict=True))
        thread = statistics.median(on_thread)
        print(
            f"tracing per submission (median of {rounds}, {count:,} submissions at {rate:,.0f}/s): "
            f"{loop:.1f} us on the event loop + {thread:.1f} us in the exporter's thread = "
            f"{loop + thread:.1f} us"
        )
    finally:
        sink.terminate()
        sink.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--submissions", type=int, default=20000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    main(args.submissions, args.rate, args.rounds)
