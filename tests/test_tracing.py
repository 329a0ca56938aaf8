"""OpenTelemetry traces: one job's trace, as a real OTLP/HTTP receiver gets it, from the
caller's traceparent (sent by the official SDK) to the callback's, across the API and a worker
process; and nothing traced, nothing sent, when no endpoint is set."""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import time
from collections.abc import Iterator

import httpx
import pytest
from chamelaion import Chamelaion
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from relay.devtools.ports import free_port
from relay.tracing import setup
from tests.helpers import AUDIO, VIDEO, relay_dev, verified
from tests.otlp import OtlpReceiver, Received, stalled_collector
from tests.servers import serve
from tests.stack import (
    RELAY_KEY,
    SANDBOX_KEY,
    Receiver,
    Stack,
    eventually,
    job_fields,
    relay_stack,
)

SECRET_QUERY = "token=s3cret-in-the-query"


@pytest.fixture
def otlp() -> Iterator[tuple[OtlpReceiver, str]]:
    receiver = OtlpReceiver()
    with serve(receiver.app()) as url:
        yield receiver, url


def otel_env(endpoint: str) -> dict[str, str]:
    # Exported every 50 ms, so nothing waits on the default 5 s batch delay.
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_SERVICE_NAME": "relay-under-test",
    }


@contextlib.contextmanager
def traced_api(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> Iterator[None]:
    """Tracing on in this process, where the stack's API runs (workers are subprocesses)."""
    for name, value in otel_env(endpoint).items():
        monkeypatch.setenv(name, value)
    assert setup.start("api")
    try:
        yield
    finally:
        setup.stop()  # exports what is queued


def one(spans: list[Received], name: str, **attributes: object) -> Received:
    found = [
        span
        for span in spans
        if span.span.name == name
        and all(span.attributes.get(key) == value for key, value in attributes.items())
    ]
    assert len(found) == 1, (name, attributes, [(s.span.name, s.attributes) for s in spans])
    return found[0]


def test_one_jobs_trace_runs_from_the_callers_traceparent_to_the_callbacks(
    redis_url: str, otlp: tuple[OtlpReceiver, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver, endpoint = otlp
    caller_trace, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    callbacks = Receiver(script=[503])  # the first attempt fails, the second is delivered
    with (
        traced_api(monkeypatch, endpoint),
        relay_stack(redis_url, receiver=callbacks, env=otel_env(endpoint), processes=True) as stack,
    ):
        job = stack.sdk().lipsync.generate(
            inputs=[{"type": "video", "url": VIDEO}, {"type": "audio", "url": AUDIO}],
            extra_body={"callback_url": f"{stack.callback_url}?{SECRET_QUERY}"},
            extra_headers={
                "traceparent": f"00-{caller_trace}-{caller_span}-01",
                "tracestate": "caller=abc",
            },
        )
        got = callbacks.wait_for(2)
        for callback in got:
            verified(stack, callback)
        stored = job_fields(redis_url, job.request_id)
    # Out of both blocks: the workers exported what they held as they stopped, the API too.
    spans = receiver.in_trace(caller_trace)
    assert receiver.content_types == {"application/x-protobuf"}
    assert stored[b"trace"].startswith(f"00-{caller_trace}-".encode())

    submission = one(spans, "POST /api/v1/lipsync/generate")
    assert submission.parent_id == caller_span  # continues the caller's trace
    assert submission.span.kind == Span.SPAN_KIND_SERVER
    assert submission.span.trace_state == "caller=abc"
    assert submission.attributes["http.request.method"] == "POST"
    assert submission.attributes["http.route"] == "/api/v1/lipsync/generate"
    assert submission.attributes["http.response.status_code"] == 200
    assert submission.resource["service.name"] == "relay-under-test"
    assert submission.resource["relay.process"] == "api"

    create_url = stack.sandbox_url + "/api/v1/lipsync/generate"
    create = one(spans, "POST", **{"url.full": create_url})
    assert create.parent_id == submission.span_id
    assert create.span.kind == Span.SPAN_KIND_CLIENT
    assert create.attributes["http.response.status_code"] == 200
    assert create.attributes["server.address"] == "127.0.0.1"

    end = one(spans, "job end")
    assert end.parent_id == submission.span_id
    assert end.attributes["relay.job.id"] == job.request_id
    assert end.attributes["relay.job.status"] == "completed"
    assert end.resource["relay.process"] == "worker"
    # Linked to the poll or the sweep page that saw the end; a page, which serves many jobs, is
    # a trace of its own and links back to this job's.
    (link,) = end.links
    (seen_by,) = [span for span in receiver.all() if (span.trace_id, span.span_id) == link]
    assert seen_by.span.name == "GET"
    assert seen_by.span.kind == Span.SPAN_KIND_CLIENT
    assert seen_by.attributes["http.response.status_code"] == 200
    if seen_by.trace_id != caller_trace:
        assert (caller_trace, submission.span_id) in seen_by.links
    else:
        assert seen_by.parent_id == submission.span_id

    attempts = sorted(
        (span for span in spans if "relay.delivery.attempt" in span.attributes),
        key=lambda span: int(str(span.attributes["relay.delivery.attempt"])),
    )
    assert [
        (
            span.span.name,
            span.attributes["relay.delivery.attempt"],
            span.attributes["relay.delivery.outcome"],
            span.attributes["http.response.status_code"],
        )
        for span in attempts
    ] == [("POST", 0, "retry", 503), ("POST", 1, "delivered", 200)]
    assert all(span.parent_id == submission.span_id for span in attempts)
    # Where each went: the callback's scheme, host and port, never its path or query.
    hook = httpx.URL(stack.callback_url)
    assert {
        (
            span.attributes["url.scheme"],
            span.attributes["server.address"],
            span.attributes["server.port"],
        )
        for span in attempts
    } == {(hook.scheme, hook.host, hook.port)}
    assert attempts[0].attributes["error.type"] == "503"
    assert attempts[0].span.status.code == attempts[0].span.status.STATUS_CODE_ERROR
    # Each callback continues the job's trace under its own attempt's span.
    assert [callback.headers["traceparent"] for callback in got] == [
        f"00-{caller_trace}-{span.span_id}-01" for span in attempts
    ]
    assert all(callback.headers["tracestate"] == "caller=abc" for callback in got)

    # No callback URL's path or query in any span, nor anything of the request body, nor a
    # key or a signing secret: in no field (attributes, events, links, status, names).
    never = [SECRET_QUERY, "/hook", VIDEO, RELAY_KEY, SANDBOX_KEY, *stack.webhook_secrets]
    for span in receiver.all():
        for value in span.attributes.values():
            assert "s3cret" not in str(value) and "/hook" not in str(value), span.attributes
        encoded = span.span.SerializeToString() + repr(span.resource).encode()
        assert [text for text in never if text.encode() in encoded] == [], span.span


def test_a_submission_without_traceparent_starts_a_trace(
    redis_url: str, otlp: tuple[OtlpReceiver, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver, endpoint = otlp
    callbacks = Receiver()
    with (
        traced_api(monkeypatch, endpoint),
        relay_stack(redis_url, receiver=callbacks, env=otel_env(endpoint), processes=True) as stack,
    ):
        job = stack.sdk().lipsync.generate(
            inputs=[{"type": "video", "url": VIDEO}, {"type": "audio", "url": AUDIO}],
            extra_body={"callback_url": stack.callback_url},
        )
        (callback,) = callbacks.wait_for(1)
    trace_id = callback.headers["traceparent"].split("-")[1]
    spans = receiver.in_trace(trace_id)
    submission = one(spans, "POST /api/v1/lipsync/generate")
    assert submission.parent_id == ""  # the trace's root
    assert one(spans, "job end").attributes["relay.job.id"] == job.request_id
    attempt = one(spans, "POST", **{"relay.delivery.attempt": 0})
    # Sampled; the relay's own trace id is random, and says so (W3C trace context level 2).
    assert callback.headers["traceparent"] == f"00-{trace_id}-{attempt.span_id}-03"


def submit(stack: Stack, **headers: str) -> str:
    """One submission (with `headers`, such as a traceparent); its request id."""
    return (
        stack.sdk()
        .lipsync.generate(
            inputs=[{"type": "video", "url": VIDEO}, {"type": "audio", "url": AUDIO}],
            extra_body={"callback_url": stack.callback_url},
            extra_headers=headers,
        )
        .request_id
    )


def export_one_span(process: str) -> None:
    """Trace this process as `process` (from the environment), end one span and stop, which
    exports it."""
    assert setup.start(process)
    try:
        tracer = setup.active()
        assert tracer is not None
        tracer.start_span("job end").end()
    finally:
        setup.stop()


def sdk_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the OpenTelemetry SDK and exporter logged."""
    return [r.getMessage() for r in caplog.records if r.name.startswith("opentelemetry")]


def test_a_collector_that_never_answers_holds_up_no_exit(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every export waits out its timeout. The batch processor exports at a process's exit each
    # queued batch in turn, up to 30 s: past the slack the chart's grace periods leave over
    # the drains (docs/kubernetes.md), so a rollout would end in SIGKILLs.
    callbacks = Receiver()
    with stalled_collector() as endpoint:
        env = {**otel_env(endpoint), "OTEL_EXPORTER_OTLP_TIMEOUT": "30"}
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        with relay_stack(redis_url, receiver=callbacks, env=env, processes=True) as stack:
            assert setup.start("api")
            try:
                submit(stack)
                callbacks.wait_for(1)
                # The worker's first spans (the job's end) are in an export that waits, the
                # attempt's queued behind it; the API's (the submission's) wait in one too.
                time.sleep(0.5)
                (worker,) = stack.workers
                started = time.monotonic()
                assert stack.stop_worker(worker) == 0
                worker_exit = time.monotonic() - started
            finally:
                started = time.monotonic()
                setup.stop()
                api_stop = time.monotonic() - started
    assert api_stop < 5
    assert worker_exit < 8


def test_an_unreachable_collector_is_logged_once_not_for_every_batch(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there: every export refused
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")  # each batch given up within a second
    with (
        caplog.at_level(logging.INFO),
        traced_api(monkeypatch, endpoint),
        relay_stack(redis_url) as stack,
    ):
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            submit(stack)  # its spans a batch of their own (exports every 50 ms)
            time.sleep(0.2)
    logged = sdk_records(caplog)
    assert len(logged) == 1, logged
    assert "spans" in logged[0]


def test_a_callers_malformed_tracestate_is_dropped_without_a_log_line(
    redis_url: str,
    otlp: tuple[OtlpReceiver, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Any caller could otherwise write a warning line (quoting its header) with every request.
    receiver, endpoint = otlp
    caller_trace, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    states = ["not a list member", ",".join(f"k{i}=v" for i in range(33)), "a=1,a=2"]
    with (
        caplog.at_level(logging.INFO),
        traced_api(monkeypatch, endpoint),
        relay_stack(redis_url) as stack,
    ):
        for state in states:
            submit(stack, traceparent=f"00-{caller_trace}-{caller_span}-01", tracestate=state)
    submissions = [
        span
        for span in receiver.in_trace(caller_trace)
        if span.span.name == "POST /api/v1/lipsync/generate"
    ]
    assert [(span.parent_id, span.span.trace_state) for span in submissions] == [
        (caller_span, "")
    ] * len(states)
    assert sdk_records(caplog) == []


def test_a_tracestate_sent_as_several_fields_is_one_list(
    redis_url: str, otlp: tuple[OtlpReceiver, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # W3C trace context: several tracestate fields MUST be combined (RFC 9110's field order).
    receiver, endpoint = otlp
    caller_trace, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    with traced_api(monkeypatch, endpoint), relay_stack(redis_url) as stack:
        response = httpx.post(
            stack.api_url + "/api/v1/lipsync/generate",
            json={
                "inputs": [{"type": "video", "url": VIDEO}, {"type": "audio", "url": AUDIO}],
                "callback_url": stack.callback_url,
            },
            headers=[
                ("x-api-key", RELAY_KEY),
                ("traceparent", f"00-{caller_trace}-{caller_span}-01"),
                ("tracestate", "rojo=00f067aa0ba902b7"),
                ("tracestate", "congo=t61rcWkgMzE"),
            ],
        )
        assert response.status_code == 200, response.text
    submission = one(receiver.in_trace(caller_trace), "POST /api/v1/lipsync/generate")
    assert submission.span.trace_state == "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"


def test_a_parent_based_sampler_keeps_the_create_with_its_submission(
    redis_url: str, otlp: tuple[OtlpReceiver, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A sampler other than the default is asked about each span with its parent: the create's
    # is the submission's span (current for the relay's spans only, not in OpenTelemetry's
    # context), so at a ratio of 0 a sampled caller's create is kept with its submission.
    receiver, endpoint = otlp
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    sampled, unsampled = secrets.token_hex(16), secrets.token_hex(16)
    with traced_api(monkeypatch, endpoint), relay_stack(redis_url) as stack:
        submit(stack, traceparent=f"00-{sampled}-{secrets.token_hex(8)}-01")
        submit(stack, traceparent=f"00-{unsampled}-{secrets.token_hex(8)}-00")
        submit(stack)  # a trace of its own, at a ratio of 0: not sampled
    submission = one(receiver.all(), "POST /api/v1/lipsync/generate")  # nothing of the others
    assert submission.trace_id == sampled
    assert one(receiver.in_trace(sampled), "POST").parent_id == submission.span_id
    assert receiver.in_trace(unsampled) == []


@pytest.mark.parametrize(
    ("environ", "service_name"),
    [
        ({}, "chamelaion-relay"),
        ({"OTEL_SERVICE_NAME": "named"}, "named"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=attributed,team=media"}, "attributed"),
        (
            {"OTEL_RESOURCE_ATTRIBUTES": "service.name=attributed", "OTEL_SERVICE_NAME": "named"},
            "named",
        ),
    ],
)
def test_the_service_name_comes_from_the_standard_variables(
    otlp: tuple[OtlpReceiver, str],
    monkeypatch: pytest.MonkeyPatch,
    environ: dict[str, str],
    service_name: str,
) -> None:
    receiver, endpoint = otlp
    for name in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    export_one_span("worker")
    (span,) = receiver.all()
    assert span.resource["service.name"] == service_name
    assert span.resource["relay.process"] == "worker"
    if "team=media" in environ.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        assert span.resource["team"] == "media"


def test_relay_dev_traces_when_an_endpoint_is_set(otlp: tuple[OtlpReceiver, str]) -> None:
    # What a developer trying tracing out runs first.
    receiver, endpoint = otlp
    with relay_dev(**otel_env(endpoint)) as (port, banner):
        key = re.search(r"key: (\S+)\)", banner)
        assert key, "relay dev printed no key"
        sdk = Chamelaion(api_key=key.group(1), base_url=f"http://127.0.0.1:{port}/api")
        job = sdk.lipsync.generate(
            inputs=[{"type": "video", "url": VIDEO}, {"type": "audio", "url": AUDIO}]
        )

        def job_end() -> list[Received]:
            return [
                span
                for span in receiver.all()
                if span.span.name == "job end"
                and span.attributes.get("relay.job.id") == job.request_id
            ]

        (end,) = eventually(job_end, timeout=30)
        (submission,) = [
            span
            for span in receiver.in_trace(end.trace_id)
            if span.span.name == "POST /api/v1/lipsync/generate"
        ]
        assert submission.resource["relay.process"] == "dev"


def test_without_an_endpoint_nothing_is_traced_or_sent(redis_url: str) -> None:
    assert setup.active() is None
    callbacks = Receiver()
    with relay_stack(redis_url, receiver=callbacks, processes=True) as stack:
        job = stack.sdk().lipsync.generate(
            inputs=[{"type": "video", "url": VIDEO}, {"type": "audio", "url": AUDIO}],
            extra_body={"callback_url": stack.callback_url},
            extra_headers={"traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"},
        )
        (callback,) = callbacks.wait_for(1)
        stored = job_fields(redis_url, job.request_id)
    assert b"trace" not in stored
    assert "traceparent" not in callback.headers


@pytest.mark.parametrize(
    ("environ", "wanted"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
        # A list, as the specification allows: OTLP among others.
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                "OTEL_TRACES_EXPORTER": "otlp,console",
            },
            True,
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "console"},
            False,
        ),
        ({"OTEL_SERVICE_NAME": "relay"}, False),
    ],
)
def test_tracing_is_on_only_with_an_otlp_endpoint(environ: dict[str, str], wanted: bool) -> None:
    assert setup.wanted(environ) is wanted


@pytest.mark.parametrize(
    "variable", ["OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"]
)
def test_a_malformed_collector_header_is_named_but_its_value_never_logged(
    otlp: tuple[OtlpReceiver, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    variable: str,
) -> None:
    # The SDK drops an entry it cannot parse (here a ";" in the value) and quoted it whole,
    # credential and all, in a warning.
    receiver, endpoint = otlp
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv(variable, "x-team=media,authorization=Bearer s3cr;et-token")
    with caplog.at_level(logging.INFO):
        export_one_span("api")
    assert len(receiver.all()) == 1
    assert "s3cr" not in caplog.text and "et-token" not in caplog.text
    (named,) = [r for r in caplog.records if "authorization" in r.getMessage()]
    assert named.levelno == logging.WARNING


@pytest.mark.parametrize(
    "variable", ["OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"]
)
def test_a_protocol_other_than_http_protobuf_is_named_at_start(
    otlp: tuple[OtlpReceiver, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    variable: str,
) -> None:
    # The relay speaks OTLP/HTTP with protobuf only: pointed at a gRPC port, every export
    # would fail with nothing saying why.
    _, endpoint = otlp
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv(variable, "grpc")
    with caplog.at_level(logging.INFO, logger="relay.tracing.setup"):
        assert setup.start("api")
        setup.stop()
    assert [r.levelno for r in caplog.records if f"{variable}=grpc" in r.getMessage()] == [
        logging.WARNING
    ]


def test_the_relays_encoder_writes_what_the_official_one_does() -> None:
    # Every kind of field a span can hold: remote and local parents, a tracestate, links,
    # events, an error status, every attribute type (and True and 1 under one key); spans of
    # the relay's tracer and of the SDK's.
    from opentelemetry import trace
    from opentelemetry.context import Context
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import (
        encode_spans as official,
    )
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )
    from opentelemetry.trace import Link, SpanKind, Status, StatusCode
    from opentelemetry.util.types import AttributeValue

    from relay.tracing import otlp, spans
    from relay.tracing.tracer import Tracer

    class Kept(SpanExporter):
        def __init__(self) -> None:
            self.spans: list[ReadableSpan] = []

        def export(self, batch: object) -> SpanExportResult:
            assert isinstance(batch, tuple | list)
            self.spans.extend(batch)
            return SpanExportResult.SUCCESS

    kept = Kept()
    provider = TracerProvider(resource=Resource.create({"service.name": "s", "n": 3}))
    provider.add_span_processor(SimpleSpanProcessor(kept))
    tracer = provider.get_tracer("relay", "1.0", schema_url="https://opentelemetry.io/schemas/1")
    caller = spans.parse(f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01", "a=1,b=2")
    values: dict[str, AttributeValue] = {
        "s": "text",
        "i": -5,
        "big": 2**40,
        "f": 1.5,
        "b": False,
        "bytes": b"\x00\x01",
        "list": ["x", "y"],
        "ints": [1, 2],
        "relay.job.id": "j1",
    }
    for round_ in range(2):  # the second round's pairs come from the encoder's cache
        with tracer.start_as_current_span(
            "server",
            context=trace.set_span_in_context(trace.NonRecordingSpan(caller)),
            kind=SpanKind.SERVER,
            attributes=values,
        ) as server:
            server.add_event("e", {"k": "v", "flag": True})
            with tracer.start_as_current_span("client", kind=SpanKind.CLIENT) as client:
                client.set_attribute("same", True if round_ else 1)
                client.set_status(Status(StatusCode.ERROR, "broke"))
        tracer.start_span(
            "linked",
            context=Context(),
            links=[Link(server.get_span_context(), {"relay.job.id": "j1"})],
            kind=SpanKind.CONSUMER,
        ).end()
    # The same from the relay's own tracer, whose spans are what its exporter gets.
    ours_provider = TracerProvider(resource=Resource.create({"service.name": "relay"}))
    relay = Tracer(ours_provider, SimpleSpanProcessor(kept))
    for round_ in range(2):
        server = relay.start_span("server", context=caller, kind=SpanKind.SERVER, attributes=values)
        server.add_event("e", {"k": "v", "flag": True})
        with trace.use_span(server, end_on_exit=True):
            client = relay.start_span("client", kind=SpanKind.CLIENT)
            client.set_attribute("same", True if round_ else 1)
            client.set_status(Status(StatusCode.ERROR, "broke"))
            # What no OTLP value holds (an int past int64, an object), which the official
            # encoder leaves out: not written as another number or an empty value.
            client.set_attributes({"huge": 2**64, "odd": [1, object()]})  # type: ignore[list-item]
            client.end()
        page = relay.start_span("linked", context=spans.ROOT, kind=SpanKind.CONSUMER)
        page.add_link(server.get_span_context(), {"relay.job.id": "j1"})
        page.end()
        # Spans alike but for their ids and times (the second round's from the encoder's
        # cache of what follows those), and ones that differ only by a value's type or a status.
        for value, status in ((1, None), (True, None), (1, StatusCode.ERROR)):
            alike = relay.start_span("alike", context=caller, attributes={"n": value, "s": "x"})
            if status is not None:
                alike.set_status(Status(status, "broke"))
            alike.end()
        # A job's spans: alike but for the job's id (encoded afresh, in its place among the
        # attributes), with a link to the page that saw it.
        for job in ("j1", "j2"):
            relay.start_span(
                "job end",
                context=caller,
                links=[Link(page.get_span_context())],
                attributes={"relay.job.id": job, "relay.job.status": "completed", "n": 2},
            ).end()
    other = TracerProvider(resource=Resource.create({"service.name": "other"}))
    other.add_span_processor(SimpleSpanProcessor(kept))
    other.get_tracer("x").start_span("elsewhere", kind=SpanKind.PRODUCER).end()

    assert len(kept.spans) == 23
    ours = ExportTraceServiceRequest.FromString(otlp.encode_spans(kept.spans))
    theirs = ExportTraceServiceRequest.FromString(official(kept.spans).SerializeToString())
    assert ours == theirs
    assert len(ours.resource_spans) == 3
    relays = ours.resource_spans[1].scope_spans[0].spans
    assert [span.name for span in relays] == [
        *("client", "server", "linked", "alike", "alike", "alike", "job end", "job end")
    ] * 2
    assert [relays[n].attributes[0].value.string_value for n in (6, 7, 14, 15)] == [
        "j1",
        "j2",
    ] * 2
    assert [relays[n].attributes[0].value.WhichOneof("value") for n in (3, 4, 5)] == [
        "int_value",
        "bool_value",
        "int_value",
    ]
    assert relays[1].parent_span_id == caller.span_id.to_bytes(8, "big")
    assert relays[1].trace_state == "a=1,b=2"
    assert relays[0].parent_span_id == relays[1].span_id


@pytest.mark.parametrize(
    "traceparent",
    [
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
        " 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-03 ",
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-later",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-later",
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
        "garbage",
        "",
    ],
)
@pytest.mark.parametrize(
    "tracestate",
    [
        None,
        "a=1,b=2",
        " a=1 ,\tb=2, ,",
        "tenant@vendor=x y",
        "a=1,a=2",
        ",".join(f"k{i}=v" for i in range(32)),
        ",".join(f"k{i}=v" for i in range(33)),
        "Upper=1",
        "bad state,,=",
        "",
    ],
)
def test_the_w3c_headers_read_and_written_as_the_sdks_propagator_does(
    traceparent: str, tracestate: str | None
) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from relay.tracing import spans
    from relay.tracing.tracer import Tracer

    propagator = TraceContextTextMapPropagator()
    headers = {"traceparent": traceparent}
    if tracestate is not None:
        headers["tracestate"] = tracestate
    theirs = trace.get_current_span(propagator.extract(headers)).get_span_context()
    # From an ASGI request's raw headers, as relay.api.traced reads them.
    raw = [
        (b"host", b"relay"),
        *((name.encode(), value.encode()) for name, value in headers.items()),
    ]
    ours = spans.from_scope(raw)
    assert ours.is_valid == theirs.is_valid
    if theirs.is_valid:
        assert ours == theirs
        assert ours.trace_state == theirs.trace_state
        written: dict[str, str] = {}
        propagator.inject(written, trace.set_span_in_context(trace.NonRecordingSpan(theirs)))
        assert spans.headers(trace.NonRecordingSpan(ours)) == written
        kept = spans.keep(trace.NonRecordingSpan(ours))
        assert spans.restore(kept) == theirs
        # A relay span under it (an attempt's): its headers from its own fields, as the
        # propagator writes them (not sampled, it is no relay span, and written as any other).
        tracer = Tracer(TracerProvider(), SpanProcessor())
        child = tracer.start_span("POST", context=ours)
        for_child: dict[str, str] = {}
        propagator.inject(for_child, trace.set_span_in_context(child))
        assert tracer.headers(child) == spans.headers(child) == for_child
