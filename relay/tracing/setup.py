"""Start and stop this process's tracer from the standard `OTEL_*` variables.

One tracer per process, held here: every stage asks `active()` and does nothing when it is
None. The global OpenTelemetry provider is left alone, so a library that instruments itself
through it adds nothing unasked, and a process that never calls `start` (a test's in-process
worker) never traces.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the SDK is imported only once tracing starts
    from relay.tracing.tracer import Tracer

log = logging.getLogger(__name__)

SERVICE_NAME = "chamelaion-relay"
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

_tracer: Tracer | None = None
_provider: object | None = None  # the SDK's TracerProvider, typed loosely: imported lazily


def active() -> Tracer | None:
    """This process's tracer; None when tracing is off."""
    return _tracer


def wanted(environ: dict[str, str] | None = None) -> bool:
    """Whether the environment asks for traces: an OTLP endpoint set, the SDK not disabled and
    no exporter other than OTLP named."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() not in ("otlp", ""):
        return False
    return any(env.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def start(process: str) -> bool:
    """Trace this process (`api`, `worker`, `dev`) when the environment asks; True if on.

    The SDK is imported only then, so a relay without an endpoint loads none of it.
    """
    global _tracer, _provider
    if _tracer is not None or not wanted():
        return _tracer is not None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from relay.tracing.otlp import SpanExporter
    from relay.tracing.tracer import Tracer

    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over these defaults (Resource.create).
    defaults = {"service.name": SERVICE_NAME, "relay.process": process}
    if os.environ.get("OTEL_SERVICE_NAME"):
        defaults.pop("service.name")
    provider = TracerProvider(resource=Resource.create(defaults))  # sampler: OTEL_TRACES_SAMPLER
    # Spans are exported from the processor's own thread, in batches (OTEL_BSP_*): a span
    # costs its caller a queue append, never a network round trip.
    processor = BatchSpanProcessor(SpanExporter())
    provider.add_span_processor(processor)  # so that the provider's shutdown flushes it
    _provider = provider
    _tracer = Tracer(provider, processor)
    log.info("tracing on: spans go to the OTLP endpoint", extra={"relay_process": process})
    return True


def stop() -> None:
    """Export what is queued and stop tracing (at a process's exit)."""
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        from opentelemetry.sdk.trace import TracerProvider

        assert isinstance(provider, TracerProvider)
        provider.shutdown()
