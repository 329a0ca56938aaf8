"""The outbound transport fails as httpx fails: each misbehaving server on loopback, and every
aiohttp error class, end as the httpx error that says what happened."""

from __future__ import annotations

import asyncio
import inspect

import aiohttp
import aiohttp.client_exceptions
import httpx
import pytest

from relay.devtools.ports import free_port
from relay.http_client import ERRORS, AiohttpTransport
from tests.servers import Handler, answer, raw_server, too_many_headers


async def fetch(url: str, timeout: float = 5.0) -> httpx.Response:
    transport = AiohttpTransport()
    request = httpx.Request("GET", url, extensions={"timeout": httpx.Timeout(timeout).as_dict()})
    try:
        response = await transport.handle_async_request(request)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response
    finally:
        await transport.aclose()


async def bad_status_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await answer(writer, b"HTTP/1.1 two hundred\r\ncontent-length: 0\r\n\r\n")


async def body_cut_short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await answer(writer, b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{}")


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    pass


async def say_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(2)


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        (too_many_headers, httpx.RemoteProtocolError),
        (bad_status_line, httpx.RemoteProtocolError),
        (body_cut_short, httpx.RemoteProtocolError),
        (hang_up, httpx.ReadError),
        (say_nothing, httpx.ReadTimeout),
    ],
)
async def test_a_misbehaving_server_ends_as_the_httpx_error_for_it(
    handler: Handler, expected: type[httpx.TransportError]
) -> None:
    async with raw_server(handler) as url:
        with pytest.raises(httpx.TransportError) as caught:
            await fetch(url, timeout=0.5)
    assert type(caught.value) is expected
    assert isinstance(caught.value.__cause__, aiohttp.ClientError)


async def test_a_refused_connection_is_a_connect_error() -> None:
    with pytest.raises(httpx.TransportError) as caught:
        await fetch(f"http://127.0.0.1:{free_port()}/")
    assert type(caught.value) is httpx.ConnectError
    assert isinstance(caught.value.__cause__, aiohttp.ClientConnectorError)


def client_errors() -> list[type[BaseException]]:
    return [
        error
        for name in aiohttp.client_exceptions.__all__
        if inspect.isclass(error := getattr(aiohttp.client_exceptions, name))
        and issubclass(error, aiohttp.ClientError)
    ]


def mapped(error: type[BaseException]) -> type[httpx.TransportError]:
    return next(target for source, target in ERRORS if issubclass(error, source))


def test_every_aiohttp_client_error_has_a_considered_mapping() -> None:
    # Those left to the catch-all are never raised for a request without redirects: an
    # aiohttp release that adds an error class fails this test until it is placed in ERRORS.
    left_to_the_catch_all = {
        error.__name__ for error in client_errors() if mapped(error) is httpx.TransportError
    }
    assert left_to_the_catch_all == {"ClientError", "RedirectClientError"}
    assert mapped(aiohttp.ServerDisconnectedError) is httpx.ReadError
    assert mapped(aiohttp.ClientConnectorCertificateError) is httpx.ConnectError
    assert mapped(aiohttp.SocketTimeoutError) is httpx.ReadTimeout
    assert mapped(aiohttp.ConnectionTimeoutError) is httpx.ConnectTimeout
