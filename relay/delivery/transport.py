"""The HTTP client that delivers callbacks, connecting only to addresses the policy allowed.

A check when the URL is submitted is not enough: DNS may answer differently at delivery time
(rebinding), so the check sits where the connection is made.

- Host names: aiohttp's connector asks `PolicyResolver` for addresses; it resolves, checks
  every answer with the policy and hands the connector only those, so the socket connects to
  exactly what was checked. The URL is never rewritten, so the Host header and TLS SNI stay
  the URL's host name and certificates are verified against it.
- IP literals: aiohttp never calls the resolver for them, so `PolicyTransport` checks them
  before sending, and every URL's port. It runs `parse_callback_url` on every request too, so
  a URL stored before a rule changed, or built elsewhere, is judged by the same rules as at
  submission.
- Redirects are never followed (the aiohttp transport passes `allow_redirects=False`): a 3xx
  comes back to the caller as it is.

A refusal surfaces as `DestinationRefused`, an `httpx.ConnectError`, so the delivery code
treats it like any failed connection attempt, and can tell it apart to stop retrying early.
"""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from ipaddress import ip_address

import aiohttp
import httpx
from aiohttp.abc import AbstractResolver, ResolveResult

from relay.delivery.netpolicy import NetworkPolicy, parse_callback_url, refused_name
from relay.errors import CallbackUrlRejected, DestinationRefused
from relay.http_client import AiohttpTransport, verified_tls
from relay.http_urls import parsed_url

MAX_CONNECTIONS = 100
KEEPALIVE_EXPIRY = 5.0  # httpx's default


class _AddressRefused(OSError):
    # An OSError because aiohttp's connector wraps only those from a resolver (in
    # ClientConnectorDNSError); `PolicyTransport` finds it again in the exception chain.
    def __init__(self, reason: str) -> None:
        super().__init__(errno.EACCES, reason)
        self.reason = reason


class PolicyResolver(AbstractResolver):
    """Resolves with `resolver` (aiohttp's threaded getaddrinfo by default), then refuses the
    host unless the policy allows every address it got."""

    def __init__(self, policy: NetworkPolicy, resolver: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._resolver = resolver or aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._resolver.resolve(host, port, family)
        if not results:
            raise socket.gaierror(socket.EAI_NONAME, f"host {host!r} has no addresses")
        try:
            # Scope ids (fe80::1%eth0) carry no policy meaning; the address decides.
            addresses = [ip_address(result["host"].partition("%")[0]) for result in results]
        except ValueError as exc:
            raise _AddressRefused(refused_name(host, f"resolved to a non-address ({exc})")) from exc
        reason = self._policy.check_addresses(addresses)
        if reason is not None:
            # In the attempt log, which any caller key reads: the same words as at submission.
            raise _AddressRefused(refused_name(host, reason))
        return results

    async def close(self) -> None:
        await self._resolver.close()


class PolicyTransport(httpx.AsyncBaseTransport):
    """Checks each request's URL (and IP literal) before `transport` sends it, and turns a
    refusal from `PolicyResolver` inside `transport` into `DestinationRefused`."""

    def __init__(self, policy: NetworkPolicy, transport: httpx.AsyncBaseTransport) -> None:
        self._policy = policy
        self._transport = transport

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            parsed = parse_callback_url(str(request.url))
        except CallbackUrlRejected as exc:
            raise DestinationRefused(exc.reason, request=request) from exc
        port_reason = self._policy.check_port(parsed.port)
        if port_reason is not None:
            raise DestinationRefused(port_reason, request=request)
        if parsed.ip is not None:
            reason = self._policy.check_address(parsed.ip)
            if reason is not None:
                raise DestinationRefused(reason, request=request)
        try:
            return await self._transport.handle_async_request(request)
        except httpx.TransportError as exc:
            refusal = _find_refusal(exc)
            if refusal is None:
                raise
            raise DestinationRefused(refusal.reason, request=request) from exc

    async def aclose(self) -> None:
        await self._transport.aclose()


def _find_refusal(exc: BaseException) -> _AddressRefused | None:
    # relay.http_client maps aiohttp's error to an httpx one `from` it, and aiohttp raised
    # its DNS error `from` ours: follow the causes down.
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, _AddressRefused):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


class CallbackClient:
    """POSTs callbacks straight into the policy transport.

    Not through an httpx.AsyncClient: its layers (auth, redirect handling, a cookie jar, URL
    and header merging) serve nothing here and cost a burst of callbacks a fifth of the
    worker's CPU. The request is still an httpx.Request, sent by the same transport.
    """

    def __init__(self, transport: httpx.AsyncBaseTransport, timeout: float) -> None:
        self._transport = transport
        self._timeout = httpx.Timeout(timeout).as_dict()

    @asynccontextmanager
    async def post(
        self, url: str, content: bytes, headers: dict[str, str]
    ) -> AsyncIterator[httpx.Response]:
        """The receiver's response, its body unread (read what you need of it inside)."""
        request = httpx.Request(
            "POST",
            parsed_url(url),
            content=content,
            headers=headers,
            extensions={"timeout": self._timeout},
        )
        response = await self._transport.handle_async_request(request)
        try:
            yield response
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def __aenter__(self) -> CallbackClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def make_callback_client(
    policy: NetworkPolicy,
    timeout: float,
    *,
    ssl_context: ssl.SSLContext | None = None,
    resolver: AbstractResolver | None = None,
    max_connections: int = MAX_CONNECTIONS,
) -> CallbackClient:
    """The one client that POSTs callbacks: policy-checked, pinned, never redirected.

    `ssl_context` defaults to httpx's (certifi), made once per process; `resolver` replaces the
    system resolver underneath the policy check (tests use a fixed table).
    """
    context = ssl_context or verified_tls()

    def session() -> aiohttp.ClientSession:
        # Called on the first request: aiohttp wants a running event loop.
        connector = aiohttp.TCPConnector(
            resolver=PolicyResolver(policy, resolver),
            ssl=context,
            limit=max_connections,
            keepalive_timeout=KEEPALIVE_EXPIRY,
        )
        # No cookie jar: receivers must not see each other's cookies, nor earlier ones.
        return aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False
        )

    # No proxies or .netrc credentials from the environment: nothing but this transport sends.
    return CallbackClient(PolicyTransport(policy, AiohttpTransport(client=session)), timeout)
