"""The batch processor (relay.tracing.batch) behind the relay's tracer, against a real OTLP/HTTP
receiver: spans go out in batches of OTEL_BSP_MAX_EXPORT_BATCH_SIZE as soon as one is full, the
rest within OTEL_BSP_SCHEDULE_DELAY, what is queued at the exit; a full queue drops spans and
says so once; only sampled spans are exported."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.trace import SpanKind
from opentelemetry.util.types import Attributes

from relay.tracing import setup
from relay.tracing.batch import (
    DROPS_LOGGER,
    MAX_EXPORT_BATCH_SIZE,
    MAX_QUEUE_SIZE,
    BatchProcessor,
)
from relay.tracing.otlp import SpanExporter
from relay.tracing.tracer import Tracer
from tests.otlp import OtlpReceiver, stalled_collector
from tests.servers import serve
from tests.stack import eventually


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    got = OtlpReceiver()
    with serve(got.app()) as url:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", url)
        yield got


def traced(monkeypatch: pytest.MonkeyPatch, **bsp: str) -> Tracer:
    for name, value in bsp.items():
        monkeypatch.setenv(f"OTEL_BSP_{name}", value)
    assert setup.start("api")
    tracer = setup.active()
    assert tracer is not None
    return tracer


def end_spans(tracer: Tracer, count: int) -> None:
    for n in range(count):
        tracer.start_span("job end", attributes={"n": n}).end()


def test_a_full_batch_goes_out_at_once_and_the_rest_at_the_exit(
    receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The schedule's delay (a minute) never comes: only full batches go before the exit.
    tracer = traced(monkeypatch, SCHEDULE_DELAY="60000", MAX_EXPORT_BATCH_SIZE="10")
    try:
        end_spans(tracer, 25)
        eventually(lambda: receiver.batches == [10, 10], timeout=5)
        time.sleep(0.3)
        assert receiver.batches == [10, 10]  # the 5 left wait for a batch or the delay
    finally:
        setup.stop()
    assert receiver.batches == [10, 10, 5]
    exported = [span.attributes["n"] for span in receiver.all()]
    assert len(exported) == 25
    assert set(exported) == set(range(25))


def test_what_does_not_fill_a_batch_goes_out_within_the_delay(
    receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracer = traced(monkeypatch, SCHEDULE_DELAY="200")
    try:
        end_spans(tracer, 3)
        eventually(lambda: receiver.batches == [3], timeout=3)
        end_spans(tracer, 2)
        eventually(lambda: receiver.batches == [3, 2], timeout=3)
    finally:
        setup.stop()
    assert receiver.batches == [3, 2]


def test_a_slow_collector_gets_what_was_queued_not_a_batch_for_every_few_spans(
    receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each export takes 0.2 s while spans keep coming: once a second, what is queued goes out
    # (with what comes during that export waiting for the next second), not an export of the
    # few spans that came during the last one, over and over.
    receiver.delay = 0.2
    tracer = traced(monkeypatch, SCHEDULE_DELAY="1000")
    try:
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            end_spans(tracer, 2)
            time.sleep(0.02)
        exported = len(receiver.batches)
    finally:
        setup.stop()
    assert exported <= 4, receiver.batches  # at 1, 2 and 3 s (and one in flight)
    assert sum(receiver.batches) == len(receiver.all())


def test_a_full_queue_drops_spans_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A collector that never answers: the first batch's export waits out its timeout, the
    # queue fills behind it, and what comes after is dropped and counted, not kept.
    with stalled_collector() as endpoint:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "2")
        with caplog.at_level(logging.INFO, logger="relay.tracing.batch"):
            tracer = traced(monkeypatch, MAX_QUEUE_SIZE="20", MAX_EXPORT_BATCH_SIZE="5")
            processor = tracer.processor
            assert isinstance(processor, BatchProcessor)
            try:
                end_spans(tracer, 5)  # a batch, taken by the export that hangs
                eventually(lambda: not processor._queue, timeout=5)
                end_spans(tracer, 100)
                assert processor.dropped == 80  # 20 queued, the rest dropped
            finally:
                setup.stop(timeout=0.5)
    warnings = [r.getMessage() for r in caplog.records if r.name == DROPS_LOGGER]
    assert len(warnings) == 1, warnings
    assert "OTEL_BSP_MAX_QUEUE_SIZE" in warnings[0]


def test_settings_that_are_not_positive_numbers_fall_back_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    environ = {
        "OTEL_BSP_MAX_QUEUE_SIZE": "lots",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "0",
        "OTEL_BSP_SCHEDULE_DELAY": "-5",
    }
    with caplog.at_level(logging.WARNING, logger="relay.tracing.batch"):
        processor = BatchProcessor(SpanExporter(), environ)
    try:
        assert processor._max_queue == MAX_QUEUE_SIZE
        assert processor._batch == MAX_EXPORT_BATCH_SIZE
        assert processor._delay == 5.0
        named = " ".join(r.getMessage() for r in caplog.records)
        for variable in environ:
            assert variable in named
    finally:
        processor.shutdown()
    # A batch larger than the queue could never fill: it is the queue's size.
    processor = BatchProcessor(
        SpanExporter(),
        {"OTEL_BSP_MAX_QUEUE_SIZE": "100", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "500"},
    )
    try:
        assert processor._batch == 100
    finally:
        processor.shutdown()


class RecordOnly(sampling.Sampler):
    """Records every span without sampling it: such spans are seen in the process, never
    exported."""

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: object = None,
        trace_state: object = None,
    ) -> sampling.SamplingResult:
        return sampling.SamplingResult(sampling.Decision.RECORD_ONLY)

    def get_description(self) -> str:
        return "RecordOnly"


def test_only_sampled_spans_are_exported(receiver: OtlpReceiver) -> None:
    processor = BatchProcessor(SpanExporter(), {"OTEL_BSP_SCHEDULE_DELAY": "50"})
    recording = Tracer(TracerProvider(sampler=RecordOnly(), resource=Resource({})), processor)
    sampling_ = Tracer(TracerProvider(resource=Resource({})), processor)
    try:
        seen = recording.start_span("seen, not sampled")
        assert seen.is_recording()
        seen.end()
        sampling_.start_span("sampled").end()
        eventually(lambda: len(receiver.all()) == 1, timeout=3)
        time.sleep(0.2)
    finally:
        processor.shutdown()
    assert [span.span.name for span in receiver.all()] == ["sampled"]
