"""API-key authentication for `/api/*`, accepting the same two styles Chamelaion does.

`x-api-key: KEY` or `Authorization: Bearer KEY`. Failures answer 401 with Chamelaion's own
messages, so callers see the errors they already handle. Keys are compared as SHA-256 digests
with hmac.compare_digest against every configured key: the time taken depends neither on how
much of a key matched nor on its length nor on which key matched.
"""

from __future__ import annotations

import hashlib
import hmac

import orjson
from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

PROTECTED_PREFIX = "/api/"
METRICS_PATH = "/metrics"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_name(key: bytes) -> str:
    """A name for an API key that does not reveal it (per-key limits, console sessions)."""
    return hashlib.sha256(key).hexdigest()[:16]


def caller_id(headers: dict[bytes, bytes]) -> str:
    """The name of the key a request was accepted with."""
    key = headers.get(b"x-api-key")
    if key is None:
        key = headers.get(b"authorization", b"").partition(b" ")[2].strip()
    return key_name(key)


class KeyRing:
    def __init__(self, keys: tuple[SecretStr, ...]) -> None:
        self._digests = [_digest(key.get_secret_value()) for key in keys]

    def accepts(self, candidate: str) -> bool:
        digest = _digest(candidate)
        found = False
        for known in self._digests:
            found |= hmac.compare_digest(digest, known)
        return found and bool(candidate)

    def refusal(self, headers: dict[bytes, bytes]) -> str | None:
        """None when the request carries a valid key, else the 401 message."""
        api_key = headers.get(b"x-api-key")
        if api_key is not None:
            return None if self.accepts(api_key.decode("latin-1")) else "unauthorized"
        authorization = headers.get(b"authorization")
        if authorization is None:
            return "missing authorization header"
        scheme, _, token = authorization.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer":
            return "invalid authorization format"
        token = token.strip()
        if not token:
            return "missing token"
        return None if self.accepts(token) else "invalid token"


def route_path(scope: Scope) -> str:
    """The path Starlette routes on: under a root path (a proxy's prefix), without it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class ApiKeyMiddleware:
    """Pure ASGI, so request bodies (uploads) stream through untouched.

    Guards `/api/*`, and `/metrics` too when `metrics_auth` is set. An accepted request
    carries `caller_id` in its state, for per-key limits.
    """

    def __init__(
        self,
        app: ASGIApp,
        keys: KeyRing,
        *,
        metrics_auth: bool = False,
        public: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.keys = keys
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
        headers = dict(scope["headers"])
        refusal = self.keys.refusal(headers)
        if refusal is None:
            scope.setdefault("state", {})["caller_id"] = caller_id(headers)
            await self.app(scope, receive, send)
            return
        body = orjson.dumps({"error": refusal})
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
