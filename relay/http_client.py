"""The relay's outbound HTTP transport: httpx requests sent by aiohttp, failing as httpx fails.

Both of the relay's clients (relay.upstream to Chamelaion, relay.delivery.transport for
callbacks) send through `AiohttpTransport`. httpx-aiohttp maps only some of aiohttp's errors,
some of them wrongly (a connection reset or a server that hung up becomes ConnectTimeout), and
lets the rest escape as aiohttp's own: an answer with 300 headers raised ClientResponseError
past every `except httpx.HTTPError`, and became a 500. Here every aiohttp client error, and
every timeout aiohttp raises, is mapped once, by `ERRORS`, to the httpx error that says what
happened, chained `from` aiohttp's, whether it comes while sending or while the body is read:

    aiohttp                                    httpx
    ConnectionTimeoutError                     ConnectTimeout       no connection in time
    ClientConnectorError (DNS, refused, TLS)   ConnectError         no connection: nothing sent
    InvalidURL, NonHttpUrlClientError          UnsupportedProtocol  nothing sent
    ServerTimeoutError (socket read)           ReadTimeout          no bytes in time
    ClientResponseError, ClientPayloadError    RemoteProtocolError  the answer breaks HTTP
    UploadAbortedError, ClientConnectionReset  WriteError           the request was cut short
    ServerDisconnectedError, ClientOSError     ReadError            hung up or reset meanwhile
    any other ClientConnectionError            NetworkError
    any other ClientError                      TransportError
    TimeoutError                               TimeoutException

Only ConnectError, ConnectTimeout and UnsupportedProtocol say that nothing reached the server.
"""

from __future__ import annotations

import contextlib
import functools
import ssl
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport as _LibraryTransport

# Most specific first: the first entry the error is an instance of wins.
ERRORS: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.ClientConnectorError, httpx.ConnectError),
    (aiohttp.InvalidURL, httpx.UnsupportedProtocol),
    (aiohttp.NonHttpUrlClientError, httpx.UnsupportedProtocol),
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.RemoteProtocolError),
    (aiohttp.UploadAbortedError, httpx.WriteError),
    (aiohttp.ClientConnectionResetError, httpx.WriteError),
    (aiohttp.ServerDisconnectedError, httpx.ReadError),
    (aiohttp.ClientOSError, httpx.ReadError),
    (aiohttp.ClientConnectionError, httpx.NetworkError),
    (aiohttp.ClientError, httpx.TransportError),
    (TimeoutError, httpx.TimeoutException),
)

NOTHING_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol)


def _aiohttp_error(exc: BaseException) -> BaseException | None:
    """The aiohttp error behind `exc`: itself, or the one httpx-aiohttp mapped it from."""
    for candidate in (exc, exc.__cause__):
        if isinstance(candidate, aiohttp.ClientError | TimeoutError):
            return candidate
    return None


@contextlib.contextmanager
def mapped_errors() -> Iterator[None]:
    """aiohttp's errors (raw, or as httpx-aiohttp mapped them) raised as ERRORS says."""
    try:
        yield
    except (aiohttp.ClientError, TimeoutError, httpx.TransportError) as exc:
        original = _aiohttp_error(exc)
        if original is None:
            raise  # an httpx error of our own making (a policy refusal): as it is
        for source, target in ERRORS:
            if isinstance(original, source):
                raise target(str(original) or type(original).__name__) from original
        raise  # pragma: no cover  (ERRORS ends with ClientError and TimeoutError)


class _MappedStream(httpx.AsyncByteStream):
    def __init__(self, stream: httpx.AsyncByteStream) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with mapped_errors():
            async for chunk in self._stream:
                yield chunk

    async def aclose(self) -> None:
        with mapped_errors():
            await self._stream.aclose()


@functools.cache
def verified_tls() -> ssl.SSLContext:
    """httpx's default TLS context (certifi's CAs), made once per process and shared: loading
    the CA bundle costs about 0.1 s of CPU each time, and a context is safe to share."""
    return httpx.create_ssl_context()


class AiohttpTransport(_LibraryTransport):
    """httpx-aiohttp's transport with every aiohttp error mapped by ERRORS, verifying TLS with
    the process's one context unless given another."""

    def __init__(self, **options: Any) -> None:
        options.setdefault("verify", verified_tls())
        super().__init__(**options)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        with mapped_errors():
            response = await super().handle_async_request(request)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _MappedStream(response.stream)
        return response
