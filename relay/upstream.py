"""The one way the relay talks to Chamelaion: long-lived httpx transports (aiohttp) per process.

The aiohttp transport is used because httpx's default transport collapses under concurrency on
this workload (measured: ~1,270 req/s at 4 concurrent forwards, ~360 at 32, against ~2,700 at
both on aiohttp; see bench/); relay.http_client maps its errors to httpx's. Those are mapped
here, at the boundary, to UpstreamError; `check` turns Chamelaion's error answers into the
error the relay's own caller should see.

Every answer is read up to a cap (`answer_cap`: the largest page anyone asks for, plus room):
Chamelaion's answers are small, and one that is not (a proxy's error page, a runaway body) is
cut off and counted, not read whole into memory.

Every call may spend a shared budget first (`Budget`): the API's client is given one, so its
creates, uploads and proxied reads are counted with the workers' polls, and a 429 it meets
pauses everyone. Workers spend theirs when they claim a poll or book a sweep's page, so their
client has none; the intent reconcile calls through a view of it that has (`with_budget`).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import httpx
import orjson
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import Counter

from relay.errors import UpstreamError
from relay.http_client import NOTHING_SENT, AiohttpTransport
from relay.http_urls import parsed_url
from relay.metrics import UPSTREAM_ANSWERS_CUT, UPSTREAM_CALLS, labelled
from relay.settings import Settings
from relay.tracing import setup, spans

USER_AGENT = "chamelaion-relay/0.1"
# The largest list page anyone asks Chamelaion for through the relay's own API (sweeps ask for
# RELAY_SWEEP_PAGE_SIZE, which may be more).
LIST_LIMIT_MAX = 1000
# Room per row of a list page: a LipsyncRequest is a few hundred bytes; a signed output_url
# can take a kilobyte or two more.
ROW_BYTES = 4 * 1024
ANSWER_MARGIN = 1024 * 1024


def answer_cap(settings: Settings) -> int:
    """The most bytes read from any one answer: a page of the largest size asked for, plus room."""
    return max(settings.sweep_page_size, LIST_LIMIT_MAX) * ROW_BYTES + ANSWER_MARGIN


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (delta seconds only); None if absent/odd."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue
        if 0 <= seconds < 7 * 86400:
            return seconds
    return None


def json_object(raw: bytes) -> dict[str, Any] | None:
    """`raw` parsed, when it is a JSON object; None for anything else."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def error_message(response: httpx.Response) -> str | None:
    """Chamelaion's `{"error": "..."}` text, if the body has that shape."""
    body = json_object(response.content)
    if body is not None and isinstance(body.get("error"), str):
        return str(body["error"])[:500]
    return None


def endpoint_name(path: str) -> str:
    """A low-cardinality label for an upstream path (request ids are not labels)."""
    path = path.strip("/").removeprefix("v1/")
    if path.startswith("lipsync/requests/"):
        return "lipsync/requests/{id}"
    return path


@contextlib.contextmanager
def _map_transport_errors(failures: Counter) -> Iterator[None]:
    try:
        yield
    except httpx.HTTPError as exc:
        failures.inc()
        if isinstance(exc, httpx.TimeoutException):
            raise UpstreamError(504, "Chamelaion did not answer in time") from exc
        if isinstance(exc, NOTHING_SENT):
            raise UpstreamError(502, "could not reach Chamelaion") from exc
        if isinstance(exc, httpx.RemoteProtocolError):
            raise UpstreamError(
                502, "Chamelaion's answer could not be read (not valid HTTP)"
            ) from exc
        raise UpstreamError(502, "the connection to Chamelaion was lost") from exc


class BudgetRefused(UpstreamError):
    """The shared upstream budget had no slot soon enough: nothing was sent (429)."""


class AnswerTooLarge(UpstreamError):
    """Chamelaion's answer ran past the cap on what is read of one (502): it was cut off."""


class Budget(Protocol):
    async def spend(self) -> None:
        """Return once one call may be made; raise BudgetRefused when it may not soon."""

    async def rate_limited(self, retry_after: float | None) -> None:
        """Chamelaion answered 429: pause everyone's calls."""


def may_have_arrived(exc: UpstreamError) -> bool:
    """Whether the request behind `exc` may have reached Chamelaion, and so done its work.

    Only a refusal before sending and a connection that was never made are sure not to have;
    a timeout, a connection lost after sending or an answer that could not be read may hide a
    job that exists.
    """
    if isinstance(exc, BudgetRefused):
        return False
    return not isinstance(exc.__cause__, NOTHING_SENT)


def check(response: httpx.Response) -> httpx.Response:
    """Return a 2xx response; map any other to the UpstreamError the relay's caller gets."""
    status = response.status_code
    if status < 300:
        return response
    message = error_message(response)
    retry_after = parse_retry_after(response.headers)
    if status in (401, 403):
        # The caller's own key was accepted by the relay: this is the relay's configuration.
        raise UpstreamError(
            502,
            "Chamelaion rejected the relay's own credentials; the relay operator must check "
            "CHAMELAION_API_KEY",
        )
    if status == 429:
        # Rounded up: telling the caller to come back sooner than Chamelaion asked only earns a 429.
        headers = {"retry-after": str(max(1, math.ceil(retry_after)))} if retry_after else {}
        raise UpstreamError(
            429,
            "rate limit exceeded (Chamelaion)",
            headers=headers,
        )
    if 400 <= status < 500:
        # The caller's request was refused as sent: pass Chamelaion's own words on.
        raise UpstreamError(
            status if status in (400, 404, 409, 413, 415, 422) else 400,
            message or f"Chamelaion refused the request ({status})",
        )
    raise UpstreamError(502, f"Chamelaion failed: {message or f'HTTP {status}'}")


def decode_object(response: httpx.Response) -> dict[str, Any]:
    """The JSON object of a 2xx answer, or UpstreamError when Chamelaion sent something else."""
    body = json_object(response.content)
    if body is None:
        raise UpstreamError(502, "Chamelaion sent a response that is not a JSON object")
    return body


class Upstream:
    """Two connection pools: uploads hold a connection for as long as the caller sends, so they
    get their own (sized to the upload cap), and no upload can keep a status read or a JSON
    submission waiting for a connection."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float,
        upload_connections: int = 32,
        budget: Budget | None = None,
        max_answer_bytes: int = LIST_LIMIT_MAX * ROW_BYTES + ANSWER_MARGIN,
    ) -> None:
        self.budget = budget
        self.max_answer_bytes = max_answer_bytes
        self.base_url = base_url.rstrip("/") + "/"
        url = httpx.URL(self.base_url)
        # Where its calls go, as their spans say: read once, not from the URL on every call.
        self.server = (url.host, url.port or (443 if url.scheme == "https" else 80))
        self.headers = {"x-api-key": api_key, "user-agent": USER_AGENT}
        self.timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        self.transport = AiohttpTransport(limits=httpx.Limits(max_connections=200))
        self.upload_transport = AiohttpTransport(
            limits=httpx.Limits(max_connections=upload_connections)
        )

    @classmethod
    def from_settings(cls, settings: Settings, budget: Budget | None = None) -> Upstream:
        """The relay's client for Chamelaion, as every process builds it."""
        assert settings.chamelaion_api_key is not None  # Settings.require checked it
        return cls(
            settings.chamelaion_base_url,
            settings.chamelaion_api_key.get_secret_value(),
            timeout=settings.upstream_timeout,
            upload_connections=settings.max_uploads,
            budget=budget,
            max_answer_bytes=answer_cap(settings),
        )

    def with_budget(self, budget: Budget) -> Upstream:
        """This client, on the same connections, with every call spending `budget`."""
        view = copy.copy(self)
        view.budget = budget
        return view

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        content: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
        upload: bool = False,
        spent: bool = False,
    ) -> httpx.Response:
        """Send one request (`upload`: on the uploads' own connections); transport failures
        become UpstreamError, answers are returned as-is (an answer longer than
        `max_answer_bytes` is AnswerTooLarge). `spent`: its budget slot is booked already (the
        caller booked it along with another write)."""
        if self.budget is not None and not spent:
            await self.budget.spend()
        tracer = setup.active()
        if tracer is None or not spans.current_span().is_recording():
            return await self._send(method, path, json, params, content, headers, timeout, upload)
        # Within a traced submission: the call is its child span (a worker's poll or sweep
        # page makes its own span, only once it knows the call moved a job).
        host, port = self.server
        # No traceparent goes to Chamelaion: it keeps no traces of ours, and a third party
        # need not see the callers' trace ids.
        span = tracer.start_span(
            method,
            kind=SpanKind.CLIENT,
            attributes={
                "http.request.method": method,
                "server.address": host,
                "server.port": port,
                # The operator's base URL and Chamelaion's path: no query, no key.
                "url.full": self.base_url + path.lstrip("/"),
            },
        )
        try:
            response = await self._send(
                method, path, json, params, content, headers, timeout, upload
            )
        except UpstreamError as exc:
            span.set_attribute("error.type", type(exc.__cause__ or exc).__qualname__)
            span.set_status(Status(StatusCode.ERROR))
            raise
        else:
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 400:
                span.set_attribute("error.type", str(response.status_code))
                span.set_status(Status(StatusCode.ERROR))
            return response
        finally:
            span.end()

    async def _send(
        self,
        method: str,
        path: str,
        json: Any,
        params: Mapping[str, str] | None,
        content: Any,
        headers: Mapping[str, str] | None,
        timeout: httpx.Timeout | None,
        upload: bool,
    ) -> httpx.Response:
        endpoint = endpoint_name(path)
        counter = labelled(UPSTREAM_CALLS, endpoint, "unreachable")
        if json is not None:
            content = orjson.dumps(json)
            headers = {"content-type": "application/json", **(headers or {})}
        # Straight into the transport, not through an httpx.AsyncClient: its layers (auth,
        # redirects, a cookie jar, URL and header merging) serve nothing here and cost a
        # submission about a tenth of the API's CPU. The request is the same httpx.Request.
        request = httpx.Request(
            method,
            parsed_url(self.base_url + path.lstrip("/")),
            params=params,
            content=content,
            headers={**self.headers, **headers} if headers else self.headers,
            extensions={"timeout": (timeout or self.timeout).as_dict()},
        )
        transport = self.upload_transport if upload else self.transport
        with _map_transport_errors(counter):
            status, response = await transport.read_answer(request, self.max_answer_bytes)
        labelled(UPSTREAM_CALLS, endpoint, str(status)).inc()
        if response is None:
            UPSTREAM_ANSWERS_CUT.labels(endpoint).inc()
            raise AnswerTooLarge(
                502, f"Chamelaion sent an answer longer than {self.max_answer_bytes} bytes"
            )
        if response.status_code == 429 and self.budget is not None:
            await self.budget.rate_limited(parse_retry_after(response.headers))
        return response

    async def aclose(self) -> None:
        await self.transport.aclose()
        await self.upload_transport.aclose()
