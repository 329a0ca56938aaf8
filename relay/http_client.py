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

`AiohttpTransport.read_answer` sends a request and reads its answer whole, up to a cap, into
one httpx.Response: without the streamed response and the layers of async iterators between
aiohttp and httpx that `handle_async_request` reads through (about a tenth of a submission's
CPU), but for an answer with a content-encoding, which httpx's own decoders read.
"""

from __future__ import annotations

import contextlib
import functools
import ssl
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import httpx
from aiohttp import ClientResponse, ClientSession, ClientTimeout
from httpx_aiohttp import AiohttpTransport as _LibraryTransport
from httpx_aiohttp.transport import AiohttpResponseStream

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

# What an answer read whole no longer has: its body is the decoded bytes, of a known length.
_ENCODING = (b"content-encoding", b"content-length", b"transfer-encoding")


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

    async def read_answer(
        self, request: httpx.Request, cap: int
    ) -> tuple[int, httpx.Response | None]:
        """Send `request` and read its answer whole: its status, and the answer as one
        httpx.Response of the decoded body (the encoding it came in gone from its headers), or
        None when the body runs past `cap` bytes decoded (the rest is left unread)."""
        with mapped_errors():
            answer = await self._send(request)
            try:
                if "content-encoding" in answer.headers:
                    body = await _read_decoded(answer, request, cap)
                else:
                    body = await _read_plain(answer, cap)
            finally:
                await answer.__aexit__(None, None, None)
        if body is None:
            return answer.status, None
        headers = [(k, v) for k, v in answer.raw_headers if k.lower() not in _ENCODING]
        return answer.status, httpx.Response(
            answer.status, headers=headers, content=body, request=request
        )

    async def _send(self, request: httpx.Request) -> ClientResponse:
        """The request sent as httpx-aiohttp's `handle_async_request` sends it."""
        if not isinstance(self.client, ClientSession):
            self.client = self.get_client()
        data: bytes | httpx.AsyncByteStream | None
        try:
            data = request.content or None
        except httpx.RequestNotRead:
            data = request.stream  # type: ignore[assignment]
            request.headers.pop("transfer-encoding", None)  # aiohttp frames it itself
        timeout = request.extensions.get("timeout", {})
        return await self.client.request(
            request.method,
            str(request.url),
            headers=request.headers,
            data=data,
            allow_redirects=False,
            auto_decompress=False,
            compress=False,
            timeout=ClientTimeout(
                sock_connect=timeout.get("connect"),
                sock_read=timeout.get("read"),
                connect=timeout.get("pool"),
            ),
            server_hostname=request.extensions.get("sni_hostname"),
            proxy=str(self.proxy.url) if self.proxy else None,
        ).__aenter__()


async def _read_plain(answer: ClientResponse, cap: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    # As httpx-aiohttp reads it (iter_chunked), without the iterator.
    while chunk := await answer.content.read(AiohttpResponseStream.CHUNK_SIZE):
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_decoded(answer: ClientResponse, request: httpx.Request, cap: int) -> bytes | None:
    """An encoded body, decoded by httpx's decoders as it is read (a gzip bomb counts by what
    it unpacks to)."""
    streamed = httpx.Response(
        answer.status,
        headers=answer.raw_headers,
        stream=AiohttpResponseStream(answer),
        request=request,
    )
    chunks: list[bytes] = []
    size = 0
    async for chunk in streamed.aiter_bytes():
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
