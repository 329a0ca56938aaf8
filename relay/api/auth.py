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


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


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
    """Pure ASGI, so request bodies (uploads) stream through untouched."""

    def __init__(self, app: ASGIApp, keys: KeyRing, public: tuple[str, ...] = ()) -> None:
        self.app = app
        self.keys = keys
        # Exact paths under /api/ that need no key (published public keys).
        self.public = frozenset(public)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope) if scope["type"] == "http" else ""
        if not path.startswith(PROTECTED_PREFIX) or path in self.public:
            await self.app(scope, receive, send)
            return
        refusal = self.keys.refusal(dict(scope["headers"]))
        if refusal is None:
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
