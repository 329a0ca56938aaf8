"""What kind of failure a callback attempt met, in words a receiver's team acts on.

timeout   no answer within the delivery timeout
refused   the connection was refused or the host did not resolve
reset     the connection was reset, or closed before an answer (something listens there, and
          it is not an HTTP server that answers)
tls       the TLS handshake or certificate check failed
policy    the callback network policy refused the destination (no connection was made)
protocol  the receiver's answer broke HTTP (a bad status line, too many or too long headers,
          a body cut short)
error     anything else the HTTP client raised
"""

from __future__ import annotations

import ssl
from typing import Literal, get_args

import httpx

from relay.errors import DestinationRefused

FailureClass = Literal["timeout", "refused", "reset", "tls", "policy", "protocol", "error"]
FAILURE_CLASSES: tuple[FailureClass, ...] = get_args(FailureClass)
# A connection cut by the other side, found in the chain of what relay.http_client raised (a
# ReadError or WriteError; a ConnectError for a reset right after the connection was accepted).
_RESETS = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)


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
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "protocol"
    chain = _chain(exc)
    if any(isinstance(link, ssl.SSLError | ssl.CertificateError) for link in chain):
        return "tls"
    if isinstance(exc, httpx.ReadError | httpx.WriteError) or any(
        isinstance(link, _RESETS) for link in chain
    ):
        return "reset"
    if any(isinstance(link, OSError) for link in chain) or isinstance(exc, httpx.ConnectError):
        return "refused"
    return "error"
