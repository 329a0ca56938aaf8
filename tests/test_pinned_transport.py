"""The callback client against a real server on loopback: allowed, refused, pinned, redirected."""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from hypothesis import given, settings
from pydantic import TypeAdapter, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from relay.api.models import CallbackUrl
from relay.api.multipart import MediaForm
from relay.delivery.netpolicy import NetworkPolicy
from relay.delivery.transport import CallbackClient, make_callback_client
from relay.errors import DestinationRefused
from tests.servers import serve
from tests.urls import callback_urls

REFUSED_NAME = "host 'rebind.test' is unknown or in a refused network"

ALLOW_LOOPBACK = NetworkPolicy.from_strings("127.0.0.0/8", "")
served: list[tuple[str, str, str]] = []  # (method, path, Host header) of every request served


async def record(request: Request) -> Response:
    served.append((request.method, request.url.path, request.headers["host"]))
    if request.url.path == "/redirect":
        return RedirectResponse("http://169.254.169.254/latest/meta-data/", status_code=302)
    return PlainTextResponse("ok")


APP = Starlette(routes=[Route("/{path:path}", record, methods=["GET", "POST"])])


async def post(client: CallbackClient, url: str, body: bytes = b"{}") -> httpx.Response:
    async with client.post(url, body, {"content-type": "application/json"}) as response:
        await response.aread()
        return response


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serve(APP) as base_url:
        yield base_url


@pytest.fixture
def base_url(server: str) -> str:
    served.clear()
    return server


@pytest.fixture
def port(base_url: str) -> int:
    return int(base_url.rsplit(":", 1)[1])


class TableResolver(AbstractResolver):
    """DNS from a dict: the one edge these tests do not own."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            )
            for address in self.table[host]
        ]

    async def close(self) -> None:
        pass


async def test_allowed_loopback_is_delivered(base_url: str) -> None:
    async with make_callback_client(ALLOW_LOOPBACK, timeout=5) as client:
        response = await post(client, f"{base_url}/hook", b'{"type": "job.done"}')
    assert response.status_code == 200
    assert served == [("POST", "/hook", base_url.removeprefix("http://"))]


async def test_default_policy_refuses_loopback_before_connecting(base_url: str) -> None:
    async with make_callback_client(NetworkPolicy(), timeout=5) as client:
        with pytest.raises(DestinationRefused) as caught:
            await post(client, f"{base_url}/hook")
    assert isinstance(caught.value, httpx.ConnectError)
    assert caught.value.reason == "127.0.0.1 is loopback (127.0.0.0/8)"
    assert caught.value.request.url == f"{base_url}/hook"
    assert served == []


async def test_a_name_resolving_to_loopback_is_refused_by_default(port: int) -> None:
    async with make_callback_client(NetworkPolicy(), timeout=5) as client:
        with pytest.raises(httpx.ConnectError) as caught:
            await post(client, f"http://localhost:{port}/hook")
    assert isinstance(caught.value, DestinationRefused)
    assert caught.value.reason == "host 'localhost' is unknown or in a refused network"
    assert served == []


async def test_a_name_is_delivered_with_its_own_host_header_when_allowed(port: int) -> None:
    policy = NetworkPolicy.from_strings("127.0.0.0/8, ::1/128", "")
    async with make_callback_client(policy, timeout=5) as client:
        response = await post(client, f"http://localhost:{port}/hook")
    assert response.status_code == 200
    assert served == [("POST", "/hook", f"localhost:{port}")]


async def test_redirects_are_returned_not_followed(base_url: str) -> None:
    async with make_callback_client(ALLOW_LOOPBACK, timeout=5) as client:
        response = await post(client, f"{base_url}/redirect")
    assert response.status_code == 302
    assert response.headers["location"] == "http://169.254.169.254/latest/meta-data/"
    assert [path for _, path, _ in served] == ["/redirect"]


@pytest.mark.parametrize(
    "host", ["2130706433", "0x7f000001", "127.1", "0177.0.0.1", "127.0.0.1.", "[::ffff:127.0.0.1]"]
)
async def test_unusual_spellings_are_refused_even_when_loopback_is_allowed(
    host: str, port: int
) -> None:
    async with make_callback_client(ALLOW_LOOPBACK, timeout=5) as client:
        # httpx itself refuses 0177.0.0.1 (leading zeros) before the transport sees it.
        with pytest.raises((DestinationRefused, httpx.InvalidURL)):
            await post(client, f"http://{host}:{port}/hook")
    assert served == []


async def test_urls_the_api_would_refuse_are_refused(port: int) -> None:
    async with make_callback_client(ALLOW_LOOPBACK, timeout=5) as client:
        with pytest.raises(DestinationRefused, match="credentials"):
            await post(client, f"http://user:pw@127.0.0.1:{port}/hook")
        with pytest.raises(DestinationRefused, match="metadata"):
            await post(client, "http://metadata.google.internal/computeMetadata/v1/")
    assert served == []


async def test_connects_to_the_addresses_it_checked(port: int) -> None:
    # receiver.test exists only in this table, so reaching the server proves the connection
    # used the checked answer, and nothing resolved the name again behind the check.
    resolver = TableResolver({"receiver.test": ["127.0.0.1"]})
    async with make_callback_client(ALLOW_LOOPBACK, timeout=5, resolver=resolver) as client:
        response = await post(client, f"http://receiver.test:{port}/hook")
    assert response.status_code == 200
    assert served == [("POST", "/hook", f"receiver.test:{port}")]
    assert resolver.asked == ["receiver.test"]


@pytest.mark.parametrize(
    "answers",
    [
        ["169.254.169.254"],
        ["127.0.0.1", "169.254.169.254"],  # one bad answer refuses the name
        ["10.0.0.1"],
        ["::1"],
        ["not-an-address"],
    ],
)
async def test_a_name_with_any_refused_answer_is_refused(port: int, answers: list[str]) -> None:
    resolver = TableResolver({"rebind.test": answers})
    async with make_callback_client(ALLOW_LOOPBACK, timeout=5, resolver=resolver) as client:
        with pytest.raises(DestinationRefused) as caught:
            await post(client, f"http://rebind.test:{port}/hook")
    # The attempt log says this, which any caller key reads: not where the name points.
    assert caught.value.reason == REFUSED_NAME
    assert served == []


async def test_a_rebinding_name_is_checked_on_every_resolution(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery.netpolicy")
    resolver = TableResolver({"rebind.test": ["127.0.0.1"]})
    async with make_callback_client(ALLOW_LOOPBACK, timeout=5, resolver=resolver) as client:
        assert (await post(client, f"http://rebind.test:{port}/hook")).status_code == 200
    # A later delivery (a new client, as after a restart or once the DNS cache expires) sees
    # the new answer and refuses it.
    resolver.table["rebind.test"] = ["169.254.169.254"]
    async with make_callback_client(ALLOW_LOOPBACK, timeout=5, resolver=resolver) as client:
        with pytest.raises(DestinationRefused, match=re.escape(REFUSED_NAME)):
            await post(client, f"http://rebind.test:{port}/hook")
    assert len(served) == 1
    assert "169.254.169.254 is a cloud metadata" in caplog.text  # the operator learns why


async def test_unresolvable_names_fail_as_transport_errors() -> None:
    resolver = TableResolver({})
    async with make_callback_client(ALLOW_LOOPBACK, timeout=5, resolver=resolver) as client:
        with pytest.raises(httpx.TransportError) as caught:
            await post(client, "http://missing.test/hook")
    assert not isinstance(caught.value, DestinationRefused)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for receiver.test: (certificate, key)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-nodes", "-days", "1", "-subj", "/CN=receiver.test"),
            *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-addext", "subjectAltName=DNS:receiver.test"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
async def tls_server(certificate: tuple[Path, Path]) -> AsyncIterator[tuple[int, list[str]]]:
    """An HTTPS server on 127.0.0.1 recording each TLS server name and Host header it sees."""
    seen: list[str] = []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    context.sni_callback = lambda _socket, name, _context: seen.append(f"sni={name}")

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        host = next(line for line in head.split(b"\r\n") if line.lower().startswith(b"host:"))
        seen.append(f"host={host.split(b':', 1)[1].strip().decode()}")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
    async with server:
        yield server.sockets[0].getsockname()[1], seen


async def test_tls_uses_the_host_name_for_sni_and_verification(
    certificate: tuple[Path, Path], tls_server: tuple[int, list[str]]
) -> None:
    port, seen = tls_server
    trust = ssl.create_default_context(cafile=certificate[0])
    resolver = TableResolver({"receiver.test": ["127.0.0.1"]})
    async with make_callback_client(
        ALLOW_LOOPBACK, timeout=5, ssl_context=trust, resolver=resolver
    ) as client:
        response = await post(client, f"https://receiver.test:{port}/hook")
    assert response.status_code == 200
    assert seen == ["sni=receiver.test", f"host=receiver.test:{port}"]


class AnyHostResolver(AbstractResolver):
    """Every name is the loopback server under test."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host="127.0.0.1",
                port=port,
                family=socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            )
        ]

    async def close(self) -> None:
        pass


def test_every_url_that_passes_the_submit_check_is_deliverable(port: int) -> None:
    # Finding 5: both submit routes store `CallbackUrl`'s normalised form; whatever it lets
    # through, the delivery client can send, over the same generator of hostile URLs.
    adapter: TypeAdapter[str] = TypeAdapter(CallbackUrl)
    accepted: list[str] = []

    @settings(max_examples=150, deadline=None)
    @given(callback_urls(port))
    def check(url: str) -> None:
        try:
            stored = adapter.validate_python(url)
        except ValidationError:
            return
        # The multipart route keeps what its reader checked: the same form.
        media = MediaForm(b"b0undary")
        media.feed(
            b"--b0undary\r\ncontent-disposition: form-data; name=callback_url\r\n\r\n"
            + url.encode()
            + b"\r\n--b0undary--"
        )
        assert media.callback_url == stored
        accepted.append(url)
        response = asyncio.run(deliver(stored))
        assert response.status_code == 200, (url, stored)

    async def deliver(url: str) -> httpx.Response:
        async with make_callback_client(
            ALLOW_LOOPBACK, timeout=5, resolver=AnyHostResolver()
        ) as client:
            return await post(client, url)

    check()
    assert len(accepted) > 20, "the generator must produce URLs the submit check accepts"
