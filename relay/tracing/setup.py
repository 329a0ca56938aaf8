"""Start and stop this process's tracer from the standard `OTEL_*` variables.

One tracer per process, held here: every stage asks `active()` and does nothing when it is
None. The global OpenTelemetry provider is left alone, so a library that instruments itself
through it adds nothing unasked, and a process that never calls `start` (a test's in-process
worker) never traces.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the SDK is imported only once tracing starts
    from opentelemetry.sdk.trace import TracerProvider

    from relay.tracing.otlp import SpanExporter
    from relay.tracing.tracer import Tracer

log = logging.getLogger(__name__)

SERVICE_NAME = "chamelaion-relay"
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
PROTOCOL_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
# How long a process's exit waits for its last spans. The batch processor exports what is
# queued batch by batch, each up to the exporter's timeout (10 s) with a collector that is slow
# or down; the chart's grace periods leave 5 s over the drains (docs/kubernetes.md), and a
# healthy collector takes a full queue in well under a second.
STOP_TIMEOUT = 3.0
# While the collector cannot be reached (or refuses the exports), the exporter logs each batch
# it gives up on and each retry before that: a line every second or two in every process, and
# the batch processor one each time its queue fills again. One line a minute tells as much.
FAILURE_LOG_INTERVAL = 60.0
QUIETENED_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",  # relay.tracing.otlp.CLIENT_LOGGER
    "relay.tracing.batch.drops",  # relay.tracing.batch.DROPS_LOGGER
)

# Where the SDK warns of an OTEL_EXPORTER_OTLP_HEADERS entry it cannot parse (and drops).
HEADERS_LOGGER = "opentelemetry.util.re"

_tracer: Tracer | None = None
_provider: TracerProvider | None = None
_exporter: SpanExporter | None = None


def active() -> Tracer | None:
    """This process's tracer; None when tracing is off."""
    return _tracer


def wanted(environ: dict[str, str] | None = None) -> bool:
    """Whether the environment asks for traces: an OTLP endpoint set, the SDK not disabled and
    OTLP among the exporters named, if any are."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    # A comma-separated list (the specification's); unset or empty: OTLP.
    exporters = {name.strip().lower() for name in env.get("OTEL_TRACES_EXPORTER", "").split(",")}
    if "otlp" not in exporters and exporters != {""}:
        return False
    return any(env.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def start(process: str) -> bool:
    """Trace this process (`api`, `worker`, `dev`) when the environment asks; True if on.

    The SDK is imported only then, so a relay without an endpoint loads none of it.
    """
    global _tracer, _provider, _exporter
    if _tracer is not None or not wanted():
        return _tracer is not None
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider

    from relay.tracing.batch import BatchProcessor
    from relay.tracing.otlp import SpanExporter
    from relay.tracing.tracer import Tracer

    # Resource.create puts the attributes it is given over the environment's, so the relay's
    # service name is given only when neither OTEL_SERVICE_NAME nor OTEL_RESOURCE_ATTRIBUTES
    # names one.
    attributes = {"relay.process": process}
    if not OTELResourceDetector().detect().attributes.get("service.name"):
        attributes["service.name"] = SERVICE_NAME
    # Sampler: OTEL_TRACES_SAMPLER (and _ARG).
    provider = TracerProvider(resource=Resource.create(attributes))
    # Spans are exported from the processor's own thread, in batches (OTEL_BSP_*): a span
    # costs its caller a queue append, never a network round trip.
    # The exporter reads OTEL_EXPORTER_OTLP_(TRACES_)HEADERS as it is made.
    _name_headers_only(logging.getLogger(HEADERS_LOGGER))
    exporter = SpanExporter()
    processor = BatchProcessor(exporter)
    provider.add_span_processor(processor)  # so that the provider's shutdown flushes it
    for name in QUIETENED_LOGGERS:
        _quieten(logging.getLogger(name))
    _provider, _exporter = provider, exporter
    _tracer = Tracer(provider, processor)
    for variable in PROTOCOL_VARIABLES:
        protocol = os.environ.get(variable, "").strip().lower()
        if protocol and protocol != "http/protobuf":
            log.warning(
                "tracing: %s=%s is not supported; spans go over OTLP/HTTP with protobuf",
                variable,
                protocol,
            )
    log.info("tracing on: spans go to the OTLP endpoint", extra={"relay_process": process})
    return True


def stop(timeout: float = STOP_TIMEOUT) -> None:
    """Export what is queued and stop tracing (at a process's exit), waiting at most `timeout`
    seconds: what is not out by then is dropped."""
    global _tracer, _provider, _exporter
    provider, exporter = _provider, _exporter
    _provider, _exporter, _tracer = None, None, None
    if provider is None or exporter is None:
        return
    # In a thread of its own, which a process exits without: an export to a collector that
    # does not answer cannot be interrupted.
    flushing = threading.Thread(target=provider.shutdown, name="tracing-stop", daemon=True)
    flushing.start()
    flushing.join(timeout)
    if flushing.is_alive():
        exporter.shutdown()  # no more retries, and what is still queued is not sent
        log.warning(
            "tracing: spans not exported within %s s of the exit were dropped "
            "(the OTLP collector is slow or unreachable)",
            timeout,
        )


class _OnePerInterval(logging.Filter):
    """Lets a warning or an error through when none did for `FAILURE_LOG_INTERVAL` seconds."""

    def __init__(self) -> None:
        super().__init__()
        self._last: float | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        now = time.monotonic()
        if self._last is not None and now - self._last < FAILURE_LOG_INTERVAL:
            return False
        self._last = now
        return True


def _quieten(logger: logging.Logger) -> None:
    """One warning a minute from `logger`, counted afresh from this start."""
    for found in [found for found in logger.filters if isinstance(found, _OnePerInterval)]:
        logger.removeFilter(found)
    logger.addFilter(_OnePerInterval())


class _HeaderNameOnly(logging.Filter):
    """The SDK's warning of a malformed collector header quotes the whole entry: its value is
    often a credential. Only the header's name is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "Header format invalid" in str(record.msg):
            entry = str(record.args[0]) if isinstance(record.args, tuple) and record.args else ""
            record.msg = (
                "tracing: the collector header %r in OTEL_EXPORTER_OTLP_(TRACES_)HEADERS is "
                "malformed and not sent (values must be URL-encoded)"
            )
            record.args = (entry.partition("=")[0].strip(),)
        return True


def _name_headers_only(logger: logging.Logger) -> None:
    if not any(isinstance(found, _HeaderNameOnly) for found in logger.filters):
        logger.addFilter(_HeaderNameOnly())
