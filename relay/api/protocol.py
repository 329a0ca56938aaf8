"""The API's HTTP/1.1 protocol: uvicorn's httptools protocol with the limits it lacks.

uvicorn bounds idle time between requests (keep-alive), and nothing else a client controls:
- **Time to send the headers.** A client that opens connections and sends a byte now and then
  would hold each one for ever: a connection whose request headers are not complete within
  RELAY_HTTP_HEADER_TIMEOUT of its first byte (or of the connection's opening) is closed.
- **Size of the headers.** httptools keeps a header that is still arriving in memory, however
  long (one streamed header value took 115 MB and froze the event loop): a request whose line
  and headers pass MAX_HEAD_BYTES is answered 431 and closed.
- **Requests that wait without a task.** A route may park its request (`PARK`): the app returns
  without answering, and the request is held by its connection alone (no task, no stack) until
  it is answered with bytes made once for many (`ParkedRequest.answer`) or dispatched to the
  app again (`ParkedRequest.dispatch_again`). Thousands of `Prefer: wait` reads cost little more
  than their sockets that way (relay.api.parked_reads).
- **Requests and connections apart.** uvicorn's `limit_concurrency` counts connections and
  requests together, so idle connections made every real request a 503. Here requests in
  flight are limited (RELAY_HTTP_MAX_CONCURRENCY, 503 beyond) and connections separately, in
  all and per peer address (`ConnectionTable`): past either cap the connection idle longest
  is closed to make room, and a new one is closed unanswered only when all are busy.

Bodies are bounded by the routes: RELAY_HTTP_BODY_TIMEOUT for JSON (armed only while some of
the body is still to come: `body_received`), the stall window and minimum rate for uploads.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from uvicorn._types import ASGI3Application, ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

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
# ... and under this one its ParkedRequest, by which the app may park it.
PARK = "relay.park"

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


class _Pipeline(list[tuple[RequestResponseCycle, ASGI3Application]]):
    """uvicorn's queue of pipelined requests (it appends left and pops right) as a list: an
    empty deque costs ~770 bytes, a connection each, and pipelining is rare."""

    __slots__ = ()

    def appendleft(self, item: tuple[RequestResponseCycle, ASGI3Application]) -> None:
        self.insert(0, item)


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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pipeline = _Pipeline()  # type: ignore[assignment]

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
        else:
            cycle.scope["state"][PARK] = ParkedRequest(self, cycle)
        self._run_asgi_task(cycle, app)

    def _run_asgi_task(
        self,
        cycle: RequestResponseCycle,
        app: ASGI3Application,
        context: contextvars.Context | None = None,
    ) -> None:
        task = self.loop.create_task(self._run_asgi(cycle, app), context=context)
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    async def _run_asgi(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        await cycle.run_asgi(app)
        parked = cycle.scope["state"].get(PARK)
        if isinstance(parked, ParkedRequest) and parked.parked:
            # Answered later, by bytes or by the app again.
            cycle.disconnected = False

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


class Prepared:
    """A response made once and written as the same bytes to every parked request it answers."""

    __slots__ = ("_wire", "body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        # (uvicorn's default headers it was made with, keep-alive) -> the bytes on the wire.
        self._wire: dict[bool, tuple[list[tuple[bytes, bytes]], bytes]] = {}

    def wire(self, default_headers: list[tuple[bytes, bytes]], keep_alive: bool) -> bytes:
        """The response as uvicorn would write it (its default headers first: the date, which
        uvicorn renews each second, and the server)."""
        made = self._wire.get(keep_alive)
        if made is not None and made[0] is default_headers:
            return made[1]
        content = [STATUS_LINE[self.status]]
        for name, value in (*default_headers, *self.headers):
            content += (name, b": ", value, b"\r\n")
        if not keep_alive:
            content.append(b"connection: close\r\n")
        content += (b"\r\n", self.body)
        wire = b"".join(content)
        self._wire[keep_alive] = (default_headers, wire)
        return wire


class _Unheard:
    """What a parked request's cycle signals its app by (a body arriving, a hang-up) while no
    app runs for it: nothing. A real asyncio.Event costs ~850 bytes, each parked request one."""

    def set(self) -> None:
        pass


_UNHEARD = _Unheard()


class ParkedRequest:
    """A request's handle (`PARK` in its state) by which its app may park it, and the request
    is answered once parked: held by its connection alone, with no task or stack."""

    __slots__ = ("_cycle", "_on_response", "_protocol", "parked")

    def __init__(self, protocol: ApiProtocol, cycle: RequestResponseCycle) -> None:
        self._protocol = protocol
        self._cycle = cycle
        self._on_response = cycle.on_response
        self.parked = False

    def park(self) -> None:
        """Leave the request unanswered: the app calls it as the last thing it does."""
        cycle = self._cycle
        self.parked = True
        # uvicorn's runner answers 500 for an app that returns without answering, unless its
        # client is gone: so it is told that until the app has returned (nothing runs between).
        cycle.disconnected = True
        cycle.message_event = _UNHEARD  # type: ignore[assignment]

    @property
    def state(self) -> dict[str, object]:
        """The request's state (scope["state"]), as the app left it."""
        state: dict[str, object] = self._cycle.scope["state"]
        return state

    def _gone(self) -> bool:
        cycle = self._cycle
        return cycle.disconnected or cycle.response_complete or cycle.transport.is_closing()

    def _unpark(self) -> None:
        """Back to uvicorn's cycle as a request in progress."""
        cycle = self._cycle
        self.parked = False
        cycle.on_response = self._on_response

    def _write(self, prepared: Prepared) -> bool:
        """Write `prepared` as the whole answer, as uvicorn's `send` would; False if the client
        is gone. The rest waits for `_finish`: the writes are what the clients wait for."""
        if self._gone():
            return False
        cycle = self._cycle
        cycle.response_started = True
        cycle.transport.write(
            prepared.wire(self._protocol.server_state.default_headers, cycle.keep_alive)
        )
        cycle.response_complete = True
        return True

    def _finish(self) -> None:
        # Its event stays _UNHEARD: uvicorn waits on a cycle's event only until its answer.
        self._unpark()
        cycle = self._cycle
        if not cycle.keep_alive:
            cycle.transport.close()
        cycle.on_response()

    def dispatch_again(self) -> None:
        """Have the app answer the request afresh, in a task of its own (in a context of its
        own: whatever woke it was not in the request's)."""
        if not self._gone():
            self._unpark()
            cycle = self._cycle
            cycle.message_event = asyncio.Event()
            if cycle.body or not cycle.more_body:
                cycle.message_event.set()  # what there is of the body may be read again
            self._protocol._run_asgi_task(
                self._cycle, self._protocol.app, context=contextvars.Context()
            )


def body_received(scope: Mapping[str, Any]) -> bool:
    """Whether all of the request's body has arrived, so that reading it cannot wait: known only
    to this protocol (False under any other server)."""
    handle = scope.get("state", {}).get(PARK)
    return isinstance(handle, ParkedRequest) and not handle._cycle.more_body


def answer_parked(answers: Iterable[tuple[ParkedRequest, Prepared]]) -> None:
    """Answer parked requests with prepared bytes, without a task: every answer is written
    first, then each connection is made ready for its next request (the writes are what the
    clients wait for)."""
    written = [(parked, prepared) for parked, prepared in answers if parked._write(prepared)]
    for parked, _ in written:
        parked._finish()
    statuses = Counter(
        prepared.status for parked, prepared in written if counted(parked._cycle.scope)
    )
    for status, count in statuses.items():
        count_response(status, count)  # no app ran to count them


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
