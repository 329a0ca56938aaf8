"""A local OTLP/HTTP trace receiver for the benches' tracing runs: it takes every export as a
collector would (decodes the protobuf, counts the spans) and answers 200.

Run on its own: uv run python bench/otlp_sink.py PORT; `GET /count` says how many spans (by
name), links and exports it got, so a bench can tell the relay really exported what it traced.
"""

from __future__ import annotations

import sys

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

OK = ExportTraceServiceResponse().SerializeToString()


def run(port: int) -> None:
    got: dict[str, int] = {"spans": 0, "links": 0, "exports": 0}
    names: dict[str, int] = {}

    async def traces(request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest.FromString(await request.read())
        got["exports"] += 1
        for resource in export.resource_spans:
            for scope in resource.scope_spans:
                got["spans"] += len(scope.spans)
                for span in scope.spans:
                    names[span.name] = names.get(span.name, 0) + 1
                    got["links"] += len(span.links)
        return web.Response(body=OK, content_type="application/x-protobuf")

    async def count(request: web.Request) -> web.Response:
        return web.json_response({**got, "names": names})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/count", count)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    run(int(sys.argv[1]))
