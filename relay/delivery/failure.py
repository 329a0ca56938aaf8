"""What kind of failure a callback attempt met, in words a receiver's team acts on.

timeout  no answer within the delivery timeout
refused  the connection was refused or the host did not resolve
reset    the connection was reset, or closed before an answer (something listens there, and
         it is not an HTTP server that answers)
tls      the TLS handshake or certificate check failed
policy   the callback network policy refused the destination (no connection was made)
error    anything else the HTTP client raised
"""

from __future__ import annotations

import ssl
from typing import Literal, get_args

import aiohttp
import httpx

from relay.errors import DestinationRefused
from relay.upstream import timed_out

FailureClass = Literal["timeout", "refused", "reset", "tls", "policy", "error"]
FAILURE_CLASSES: tuple[FailureClass, ...] = get_args(FailureClass)
# httpx-aiohttp reports these as httpx.ConnectTimeout: the chained error says what happened.
_RESETS = (
    ConnectionResetError,
    ConnectionAbortedError,
    BrokenPipeError,
    aiohttp.ServerDisconnectedError,
)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def failure_class(exc: BaseException) -> FailureClass:
    if isinstance(exc, DestinationRefused):
        return "policy"
    if isinstance(exc, TimeoutError) or (isinstance(exc, httpx.HTTPError) and timed_out(exc)):
        return "timeout"
    chain = _chain(exc)
    if any(isinstance(link, ssl.SSLError | ssl.CertificateError) for link in chain):
        return "tls"
    if any(isinstance(link, _RESETS) for link in chain):
        return "reset"
    if any(isinstance(link, OSError) for link in chain) or isinstance(exc, httpx.ConnectError):
        return "refused"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    return "error"
