"""Ended spans to the exporter in batches, from a thread of its own: the contract of the
OpenTelemetry SDK's batch span processor, read from the same variables
(`OTEL_BSP_SCHEDULE_DELAY`, `OTEL_BSP_MAX_QUEUE_SIZE`, `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`), with
a span's end as cheap as a queue append.

The SDK's processor reads each ended span's sampling flag through its context (a `SpanContext`
the relay's spans make only when asked, relay.tracing.tracer) and asks the process id (a system
call, 0.5 µs here) to notice a fork, for every span: on the API's submission path, two spans a
request, that was 15 % of what tracing cost the event loop (bench/README.md). Here the
relay's tracer queues only sampled spans, and a fork is noticed by `os.register_at_fork`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Mapping

from opentelemetry.sdk.environment_variables import (
    OTEL_BSP_MAX_EXPORT_BATCH_SIZE,
    OTEL_BSP_MAX_QUEUE_SIZE,
    OTEL_BSP_SCHEDULE_DELAY,
)
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)
# Spans dropped for a full queue: its own logger, which relay.tracing.setup quietens.
DROPS_LOGGER = f"{__name__}.drops"
drops_log = logging.getLogger(DROPS_LOGGER)

# The specification's defaults (the SDK's).
SCHEDULE_DELAY_MS = 5000
MAX_QUEUE_SIZE = 2048
MAX_EXPORT_BATCH_SIZE = 512


def _setting(env: Mapping[str, str], name: str, default: int) -> int:
    """A positive whole number from `env`, or `default` (with a warning) when it is not one."""
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        log.warning(
            "tracing: %s=%r is not a positive whole number; %d is used", name, text, default
        )
        return default
    return value


class BatchProcessor(SpanProcessor):
    """Queues ended spans (up to `OTEL_BSP_MAX_QUEUE_SIZE`, then drops and counts them) and
    exports them in batches of at most `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`: as soon as a batch is
    full, and everything queued every `OTEL_BSP_SCHEDULE_DELAY` ms."""

    def __init__(self, exporter: SpanExporter, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._exporter = exporter
        self._delay = _setting(env, OTEL_BSP_SCHEDULE_DELAY, SCHEDULE_DELAY_MS) / 1000
        self._max_queue = _setting(env, OTEL_BSP_MAX_QUEUE_SIZE, MAX_QUEUE_SIZE)
        # A batch larger than the queue could never fill (the SDK refuses to start).
        self._batch = min(
            _setting(env, OTEL_BSP_MAX_EXPORT_BATCH_SIZE, MAX_EXPORT_BATCH_SIZE), self._max_queue
        )
        self.dropped = 0  # spans not queued: the queue was full, or the processor stopped
        self._stopping = False
        self._start()
        # A forked child starts with an empty queue and a thread of its own (threads do not
        # survive a fork); weakly, so that the registration does not keep this alive.
        start = weakref.WeakMethod(self._start)

        def restart() -> None:
            again = start()
            if again is not None:
                again()

        os.register_at_fork(after_in_child=restart)

    def _start(self) -> None:
        self._queue: deque[ReadableSpan] = deque()
        self._full = False  # whether the queue filled since the last export (logged once)
        self._wake = threading.Event()
        self._exporting = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="relay-span-export", daemon=True)
        self._thread.start()

    def on_end(self, span: ReadableSpan) -> None:
        # Called for every span that ends, in whichever thread ends it: an append, and a wake
        # when a batch is full (deque appends and len are atomic).
        queue = self._queue
        if self._stopping or len(queue) >= self._max_queue:
            self._drop()
            return
        queue.append(span)
        if len(queue) >= self._batch and not self._wake.is_set():
            self._wake.set()

    def _drop(self) -> None:
        self.dropped += 1
        if not self._full and not self._stopping:
            self._full = True
            drops_log.warning(
                "tracing: %d spans wait for the OTLP collector (OTEL_BSP_MAX_QUEUE_SIZE); "
                "spans are dropped until it takes them",
                self._max_queue,
            )

    def _run(self) -> None:
        due = time.monotonic() + self._delay  # when what is queued goes, full batch or not
        while not self._stopping:
            self._wake.wait(max(0.0, due - time.monotonic()))
            # Cleared before the export: a batch that fills meanwhile wakes the next round.
            self._wake.clear()
            if self._stopping:
                break
            # By the clock, not by how the wait ended: a wait may end early (seen under
            # valgrind), and a full batch's wake does not put off the rest's delay.
            everything = time.monotonic() >= due
            if everything:
                due = time.monotonic() + self._delay
            self._export(everything)
        self._export(everything=True)

    def _export(self, everything: bool) -> None:
        """Export full batches, then (`everything`) what else was queued when it began; one
        export at a time. Not what comes meanwhile: a collector slower than the spans come
        would otherwise be sent batches of a few spans, one after the other, for as long as
        they do."""
        with self._exporting:
            queue, size = self._queue, self._batch
            left = len(queue) if everything else 0
            while queue and (left > 0 or len(queue) >= size):
                batch = [queue.popleft() for _ in range(min(size, len(queue)))]
                left -= len(batch)
                self._full = False
                try:
                    self._exporter.export(batch)
                except Exception:
                    log.exception("tracing: a batch of spans could not be exported")

    def shutdown(self) -> None:
        """Export what is queued and stop (at a process's exit); spans that end later are
        dropped."""
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        self._thread.join()
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        if self._stopping:
            return False
        self._export(everything=True)
        return True
