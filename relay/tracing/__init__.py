"""OpenTelemetry traces of a job's path: its submission, the polls and sweep pages that moved it,
its end and every delivery attempt, in the trace its caller started.

Off unless an OTLP endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`): then `setup.active()` is None and every call site skips
its spans after that one test, so no SDK object is made on the hot path. On, the SDK reads the
rest of the standard `OTEL_*` variables itself (service name, sampler, headers, batching).
"""
