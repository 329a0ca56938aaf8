"""What kind of failure a callback attempt met, in words a receiver's team acts on.

timeout  no answer within the delivery timeout
refused  the connection was refused, reset or the host did not resolve
tls      the TLS handshake or certificate check failed
policy   the callback network policy refused the destination (no connection was made)
error    anything else the HTTP client raised
"""

from __future__ import annotations

import ssl
from typing import Literal

import httpx

from relay.errors import DestinationRefused
from relay.upstream import timed_out

FailureClass = Literal["timeout", "refused", "tls", "policy", "error"]


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
    if any(isinstance(link, OSError) for link in chain) or isinstance(exc, httpx.ConnectError):
        return "refused"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    return "error"
