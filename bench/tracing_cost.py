"""What tracing costs a submission, in isolation: the API's own submission span (relay.api.traced,
around a Starlette request carrying a caller's traceparent), the upstream create's child span
(as relay.upstream makes it) and the job's kept context (relay.api.submit), ended and exported
to a local OTLP receiver (bench/otlp_sink.py, its own process) by the relay's exporter.

Run: uv run python bench/tracing_cost.py [--submissions 20000] [--rate 1000] [--rounds 3]
     uv run python bench/tracing_cost.py --worker [--jobs 20000] [--rate 1000] [--rounds 3]

`--worker`: what tracing costs an ended job in the worker, the same way: a sweep page's span
linked to each job it ended (relay.jobs.sweep.PageSpan, a page of 1,000 as in burst.py), each
job's end under it (relay.jobs.poller), and its callback attempt's span, headers and outcome
(relay.delivery.deliverer), paced at `--rate` jobs a second, in a process holding what a
worker does. Per-id polls' spans are left out (a page ends nearly every job in burst.py).
burst.py --tracing measures the whole worker; this says what its tracing costs, with less
noise, to set beside burst.py's CPU per ended job with tracing off.

The process first loads what an API process does (the app's modules; with `--worker`, the
worker's), so the garbage collector walks a heap of that process's size. The requests are
paced (`--rate` a second, in bursts of 50, the loop idle in between as a server's is), so the
batch processor exports as it would behind a busy API. Printed: the CPU per submission of the
event loop's thread and of the exporter's thread (the scheduler's count, from /proc), with
tracing on, less the same loop with tracing off; the median of `--rounds`. The forward bench
(`forward.py --tracing`) measures the whole API; this one says where its tracing
µs go, with little of the noise a shared machine adds to a whole-API run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

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


PAGE = 1000  # burst.py's stand-in upstream's largest list page


def worker_jobs(count: int) -> list[Any]:
    """What the worker's tracing reads of a job: its id and its kept context."""
    return [
        SimpleNamespace(
            request_id=f"fast-{n:06d}",
            trace=f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01",
        )
        for n in range(count)
    ]


async def ended_jobs(jobs: list[Any], rate: float) -> None:
    """The worker's tracing for `jobs`, a page at a time, `rate` jobs a second: nothing but
    the pacing when tracing is off."""
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind

    from relay.delivery.deliverer import Outcome, _attempt_span, _end_attempt_span
    from relay.jobs.poller import _end_span
    from relay.jobs.sweep import PageSpan
    from relay.tracing import setup, spans

    delivered = Outcome("delivered", "204", answered=True, status=204)
    pause = BURST / rate
    for start in range(0, len(jobs), PAGE):
        page_jobs = jobs[start : start + PAGE]
        tracer = setup.active()
        if tracer is not None:  # relay.jobs.sweep.Sweeper._read_page and _handle
            span = tracer.start_span("GET", context=spans.ROOT, kind=SpanKind.CLIENT)
            span.set_attributes(
                {
                    **spans.client_attributes("GET", "http", "127.0.0.1", 8100),
                    "url.template": "/v1/lipsync/requests",
                    "http.response.status_code": 200,
                    "relay.sweep.offset": start,
                }
            )
            page = PageSpan(span, time.time_ns())
            with trace.use_span(span, end_on_exit=False):
                for job in page_jobs:
                    _end_span(tracer, job, "completed", "lipsync.completed")
            page.moved(page_jobs)
            page.close()
        for n, job in enumerate(page_jobs):
            tracer = setup.active()
            if tracer is not None and job.trace:  # relay.delivery.deliverer
                attempt = _attempt_span(
                    tracer, job, 1, "http://127.0.0.1:9000", job.request_id, "lipsync.completed"
                )
                # The attempt's headers (relay.tracing.tracer.Tracer.headers, or a checkout's
                # spans.headers before it).
                getattr(tracer, "headers", spans.headers)(cast(Any, attempt))
                _end_attempt_span(attempt, delivered, "delivered")
                attempt.end()
            if n % BURST == BURST - 1:
                await asyncio.sleep(pause)


def measure(count: int, rate: float, traced: bool, worker: bool = False) -> tuple[float, float]:
    """CPU per submission, or per ended job (`worker`), in µs: of the loop, of the other
    threads."""
    from relay.tracing import setup

    if traced:
        assert setup.start("worker" if worker else "api")
    tracer = setup.active()
    jobs = worker_jobs(count) if worker else []
    before = thread_cpu()
    asyncio.run(ended_jobs(jobs, rate) if worker else submissions(count, rate))
    ran = thread_cpu()
    flush_began = time.thread_time()
    if tracer is not None:
        # The last batch too: exported in this thread, and counted with the exporter's.
        tracer.processor.force_flush()
    flushed = time.thread_time() - flush_began
    after = thread_cpu()
    setup.stop()
    return (ran[0] - before[0]) / count, (after[1] - before[1] + flushed * 1e6) / count


def main(count: int, rate: float, rounds: int, worker: bool) -> None:
    # What an API process (or a worker) holds (the modules, ~80,000 objects the collector
    # tracks in the API), so that a collection, which spans waiting for their export make more
    # of, costs what it does there.
    if worker:
        import relay.worker.process
    else:
        import relay.api.app
        import relay.serving  # noqa: F401
    from relay.devtools.ports import free_port

    unit = "ended job" if worker else "submission"

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
            loop_off, _ = measure(count, rate, traced=False, worker=worker)
            loop_on, thread_on = measure(count, rate, traced=True, worker=worker)
            off_loop.append(loop_off)
            on_loop.append(loop_on)
            on_thread.append(thread_on)
            print(
                f"round {n}: loop {loop_off:.1f} us off, {loop_on:.1f} us on; exporter thread "
                f"{thread_on:.1f} us (per {unit})",
                flush=True,
            )
        loop = statistics.median(on - off for on, off in zip(on_loop, off_loop, strict=True))
        thread = statistics.median(on_thread)
        print(
            f"tracing per {unit} (median of {rounds}, {count:,} {unit}s at {rate:,.0f}/s): "
            f"{loop:.1f} us on the event loop + {thread:.1f} us in the exporter's thread = "
            f"{loop + thread:.1f} us"
        )
    finally:
        sink.terminate()
        sink.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--submissions", type=int, default=20000)
    parser.add_argument("--worker", action="store_true", help="the worker's ended jobs (above)")
    parser.add_argument("--jobs", type=int, default=20000, help="with --worker")
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    main(args.jobs if args.worker else args.submissions, args.rate, args.rounds, args.worker)
