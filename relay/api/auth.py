"""API-key authentication for `/api/*`, accepting the same two styles Chamelaion does.

`x-api-key: KEY` or `Authorization: Bearer KEY`. Failures answer 401 with Chamelaion's own
messages, so callers see the errors they already handle. The key is resolved to its caller
(relay.callers: compared as SHA-256 digests with hmac.compare_digest against every key of
every caller, so the time taken depends neither on how much of a key matched nor on which key
matched), and the request carries that `Caller` in `scope["state"]["caller"]`.
"""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from relay.callers.model import Caller, CallerBook
from relay.callers.source import CallerSource

PROTECTED_PREFIX = "/api/"
METRICS_PATH = "/metrics"


def presented_key(headers: dict[bytes, bytes]) -> tuple[str | None, str]:
    """The key a request presents, or None and the 401 message saying what is missing."""
    api_key = headers.get(b"x-api-key")
    if api_key is not None:
        return api_key.decode("latin-1"), "unauthorized"
    authorization = headers.get(b"authorization")
    if authorization is None:
        return None, "missing authorization header"
    scheme, _, token = authorization.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer":
        return None, "invalid authorization format"
    token = token.strip()
    if not token:
        return None, "missing token"
    return token, "invalid token"


def authenticate(book: CallerBook, headers: dict[bytes, bytes]) -> Caller | str:
    """The request's caller, or the 401 message."""
    key, refusal = presented_key(headers)
    caller = book.resolve(key) if key is not None else None
    return caller if caller is not None else refusal


def request_caller(request: Request) -> Caller:
    """The caller the auth middleware accepted this request for."""
    caller: Caller = request.scope["state"]["caller"]
    return caller


def route_path(scope: Scope) -> str:
    """The path Starlette routes on: under a root path (a proxy's prefix), without it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class ApiKeyMiddleware:
    """Pure ASGI, so request bodies (uploads) stream through untouched.

    Guards `/api/*`, and `/metrics` too when `metrics_auth` is set. An accepted request
    carries its `caller` in its state (and `caller_id`, the caller's name).
    """

    def __init__(
        self,
        app: ASGIApp,
        callers: CallerSource,
        *,
        metrics_auth: bool = False,
        public: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.callers = callers
        self.metrics_auth = metrics_auth
        # Exact paths under /api/ that need no key (published public keys).
        self.public = frozenset(public)

    def _protected(self, path: str) -> bool:
        if path in self.public:
            return False
        return path.startswith(PROTECTED_PREFIX) or (self.metrics_auth and path == METRICS_PATH)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._protected(route_path(scope)):
            await self.app(scope, receive, send)
            return
        found = authenticate(self.callers.book, dict(scope["headers"]))
        if isinstance(found, Caller):
            state = scope.setdefault("state", {})
            state["caller"] = found
            # Its name alone, for per-caller limits and records (`caller_id` before callers).
            state["caller_id"] = found.name
            await self.app(scope, receive, send)
            return
        body = orjson.dumps({"error": found})
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
