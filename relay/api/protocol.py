"""The API's HTTP/1.1 protocol: uvicorn's httptools protocol with the limits it lacks.

uvicorn bounds idle time between requests (keep-alive), and nothing else a client controls:
- **Time to send the headers.** A client that opens connections and sends a byte now and then
  would hold each one for ever: a connection whose request headers are not complete within
  RELAY_HTTP_HEADER_TIMEOUT of its first byte (or of the connection's opening) is closed.
- **Size of the headers.** httptools keeps a header that is still arriving in memory, however
  long (one streamed header value took 115 MB and froze the event loop): a request whose line
  and headers pass MAX_HEAD_BYTES is answered 431 and closed.
- **Requests and connections apart.** uvicorn's `limit_concurrency` counts connections and
  requests together, so idle connections made every real request a 503. Here requests in
  flight are limited (RELAY_HTTP_MAX_CONCURRENCY, 503 beyond) and connections separately, in
  all and per peer address (`ConnectionTable`): past either cap the connection idle longest
  is closed to make room, and a new one is closed unanswered only when all are busy.

Bodies are bounded by the routes: RELAY_HTTP_BODY_TIMEOUT for JSON, the stall window and
minimum rate for uploads.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections import Counter
from dataclasses import dataclass

import orjson
from uvicorn._types import ASGI3Application, ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from relay.api.response_counts import count_response, counted
from relay.metrics import HTTP_CONNECTIONS_CLOSED

log = logging.getLogger(__name__)

# A request line and headers larger than this are answered 431. Real clients send a few KiB
# (Node's and nginx's defaults refuse past 16 and 32 KiB); the bound is what keeps a
# connection's unparsed head, and so the process's memory under thousands of them, small.
MAX_HEAD_BYTES = 64 * 1024

# After a 431 the rest of what the client sends is read and dropped for this long before the
# connection closes: closing with unread bytes sends a reset, which can reach the client
# before the 431 does and destroy it.
LINGER_SECONDS = 2.0

# The app's lifespan state may name functions under this key for the server to call as it
# starts shutting down, before it waits for requests in flight (requests that wait for a
# job's events answer then, rather than being cut off at the end of the grace period).
SHUTDOWN_HOOKS = "relay.shutdown_hooks"
# ... and under this one a function that says how many requests are parked: held open for a
# job's events, using no CPU until one comes. They do not count as requests in flight.
PARKED = "relay.parked"
# A request's state holds this key (None) under this protocol: a request that waits may put a
# function there, called if its client hangs up before the answer (no task needs to listen).
HANG_UP = "relay.hang_up"

# An IPv6 client usually holds a whole /64: its addresses count as one peer.
IPV6_PEER_PREFIX = 64


@dataclass(frozen=True)
class Limits:
    header_timeout: float
    max_requests: int
    max_connections: int
    max_connections_per_peer: int


def peer_of(host: str | None) -> str:
    """The address a connection is counted against for the per-peer cap."""
    if host is None:
        return ""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_PEER_PREFIX), strict=False))
    return str(address)


class ConnectionTable:
    """One server's open connections, in all and per peer, and which are idle, longest first.

    A connection is idle from its opening, and again after each response, until its next
    request's headers are complete: closing it then loses no request (a keep-alive client
    reconnects; one still sending headers is bounded by the header timeout anyway).
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._peers: Counter[str] = Counter()
        # dicts as ordered sets: insertion order is the order connections went idle.
        self._idle: dict[ApiProtocol, None] = {}
        self._idle_by_peer: dict[str, dict[ApiProtocol, None]] = {}

    @property
    def open(self) -> int:
        return self._peers.total()

    def admit(self, connection: ApiProtocol) -> bool:
        """Count a new connection in, closing an idle one to make room if need be; False (and
        nothing counted) when every connection in the way is busy."""
        peer = connection.peer
        if self._peers[peer] >= self.limits.max_connections_per_peer and not self._evict(
            self._idle_by_peer.get(peer, {})
        ):
            return False
        if self.open >= self.limits.max_connections and not self._evict(self._idle):
            return False
        self._peers[peer] += 1
        connection.counted = True
        self.idle(connection)
        return True

    def idle(self, connection: ApiProtocol) -> None:
        self._idle[connection] = None
        self._idle_by_peer.setdefault(connection.peer, {})[connection] = None

    def busy(self, connection: ApiProtocol) -> None:
        self._idle.pop(connection, None)
        by_peer = self._idle_by_peer.get(connection.peer)
        if by_peer is not None:
            by_peer.pop(connection, None)
            if not by_peer:
                del self._idle_by_peer[connection.peer]

    def remove(self, connection: ApiProtocol) -> None:
        """Count a connection out (idempotent: an evicted one is removed before it closes)."""
        if connection.counted:
            connection.counted = False
            self.busy(connection)
            self._peers[connection.peer] -= 1
            if not self._peers[connection.peer]:
                del self._peers[connection.peer]

    def _evict(self, idle: dict[ApiProtocol, None]) -> bool:
        if not idle:
            return False
        victim = next(iter(idle))
        self.remove(victim)
        victim.transport.close()
        HTTP_CONNECTIONS_CLOSED.labels("idle_evicted").inc()
        return True


class ApiProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above; one subclass per server
    (`protocol_class`) holds that server's limits and connection table."""

    limits: Limits
    table: ConnectionTable
    max_head_bytes = MAX_HEAD_BYTES

    peer = ""
    counted = False
    lingering = False
    _header_timer: asyncio.TimerHandle | None = None
    # Bytes of the current request's head seen so far; None once its headers are complete.
    # Counted from the end of the previous request (or the connection's opening), so bytes
    # that arrive before a request begins count too.
    _head_bytes: int | None = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.peer = peer_of(self.client[0] if self.client else None)
        if not self.table.admit(self):
            HTTP_CONNECTIONS_CLOSED.labels("refused").inc()
            transport.close()
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.table.remove(self)
        self._disarm_header_timer()
        cycle = self.cycle
        hang_up = None
        if cycle is not None and not cycle.response_complete:
            hang_up = cycle.scope.get("state", {}).get(HANG_UP)
        super().connection_lost(exc)
        if hang_up is not None:
            hang_up()

    def data_received(self, data: bytes) -> None:
        # Fed in pieces no longer than the room left for the head: the parser never holds
        # more of an unfinished head than MAX_HEAD_BYTES. Past the end of a head, the rest
        # goes in whole.
        if self.lingering:
            return
        while data and not self.transport.is_closing():
            if self._head_bytes is None:
                super().data_received(data)
                return
            room = self.max_head_bytes - self._head_bytes
            piece, data = data[:room], data[room:]
            self._head_bytes += len(piece)
            super().data_received(piece)
            if self._head_bytes is not None and self._head_bytes >= self.max_head_bytes:
                self._head_too_large()
                return

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["state"][HANG_UP] = None
        self._arm_header_timer()

    def shutdown(self) -> None:
        # Called for each open connection once the server stops taking new ones.
        for hook in self.app_state.get(SHUTDOWN_HOOKS, ()):
            hook()
        super().shutdown()

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        self._disarm_header_timer()
        self.table.busy(self)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._head_bytes = 0
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # `cycle` is the newest request: a pipelined one may have just started instead.
        if self.counted and self.cycle.response_complete and not self.transport.is_closing():
            self.table.idle(self)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        # uvicorn's own limit is off: this one counts requests in flight only.
        parked = self.app_state.get(PARKED)
        in_flight = len(self.tasks) - (parked() if parked is not None else 0)
        if in_flight >= self.limits.max_requests:
            log.warning("requests in flight at the limit: answered 503")
            app = _over_capacity
            if counted(cycle.scope):
                count_response(503)  # no app runs to count it
        super()._start_asgi_task(cycle, app)

    def _head_too_large(self) -> None:
        log.warning("request headers larger than %d bytes: answered 431", self.max_head_bytes)
        HTTP_CONNECTIONS_CLOSED.labels("headers_too_large").inc()
        count_response(431)
        body = orjson.dumps(
            {"error": f"request headers are larger than {self.max_head_bytes} bytes"}
        )
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + body
        )
        self._disarm_header_timer()
        self.lingering = True
        self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(
                self.limits.header_timeout, self._headers_late
            )

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


async def _over_capacity(
    scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
) -> None:
    body = orjson.dumps(
        {"error": "the relay is handling as many requests as it takes; retry shortly"}
    )
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1"),
                # The request's body is not read: the connection cannot carry another.
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def protocol_class(limits: Limits) -> type[ApiProtocol]:
    """A protocol class for one server: its limits and its own connection table."""
    return type("ApiProtocol", (ApiProtocol,), {"limits": limits, "table": ConnectionTable(limits)})
