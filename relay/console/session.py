"""Console sign-in: a caller's key (relay.callers), then a server-side session named by a signed
cookie. A caller's session sees its own jobs and deliveries; an admin's sees everyone's.

The session lives in Redis for eight hours at most and holds a short digest naming which
configured key signed in (so removing that key from the callers ends its sessions) and the
session's CSRF token. The cookie holds only the session's random id, signed with itsdangerous
and checked for age on every request; signing out deletes the session, so a cookie copied
before then is worth nothing after. Redis holds a digest of the id, not the id itself.

Cookies are HttpOnly, SameSite=Strict, on /console only, and Secure when the console was
reached over https (behind a proxy, as its X-Forwarded-Proto says when the proxy is one of
RELAY_FORWARDED_ALLOW_IPS), or always with RELAY_CONSOLE_SECURE_COOKIES. Every state-changing
form carries the CSRF token; the sign-in form carries one too, from a short-lived cookie of
its own (double submit).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

import orjson
from itsdangerous import BadSignature, URLSafeTimedSerializer
from redis.asyncio import Redis
from starlette.requests import Request
from starlette.responses import Response

from relay.callers.model import Caller, key_digest, key_id
from relay.callers.source import CallerSource
from relay.redis import keys
from relay.redis.batch import batcher
from relay.settings import Settings

SESSION_COOKIE = "relay_console"
LOGIN_COOKIE = "relay_console_login"
SESSION_SECONDS = 8 * 3600
LOGIN_SECONDS = 600


@dataclass(frozen=True)
class Session:
    id: str
    key_id: str
    csrf: str


class Sessions:
    def __init__(self, settings: Settings, callers: CallerSource) -> None:
        self._callers = callers
        configured = settings.console_secret
        # Without its own secret the console derives one from the callers' keys as they were
        # at start-up, so every API replica signs alike and rotating the keys ends every
        # session (with a callers file, set RELAY_CONSOLE_SECRET: the file changes at run time).
        secret = (
            configured.get_secret_value()
            if configured is not None
            else hmac.new(b"relay-console", callers.book.fingerprint(), "sha256").hexdigest()
        )
        self._sessions = URLSafeTimedSerializer(secret, salt="relay-console-session")
        self._logins = URLSafeTimedSerializer(secret, salt="relay-console-login")
        self._always_secure = settings.console_secure_cookies

    async def sign_in(self, redis: Redis, candidate: str) -> tuple[Session, Caller] | None:
        """A new session for `candidate`, if it is a caller's key, and that caller; stored
        before it is used. A caller's session shows its own jobs; an admin's, everyone's."""
        caller = self._callers.book.resolve(candidate)
        if caller is None:
            return None
        session = Session(
            secrets.token_urlsafe(32), key_id(key_digest(candidate)), secrets.token_urlsafe(32)
        )
        record = orjson.dumps({"k": session.key_id, "c": session.csrf})
        await batcher(redis).run([("SET", _key(session.id), record, "EX", SESSION_SECONDS)])
        return session, caller

    async def read(self, redis: Redis, request: Request) -> Session | None:
        session_id = _signed(request, SESSION_COOKIE, self._sessions, SESSION_SECONDS)
        if not isinstance(session_id, str):
            return None
        (record,) = await batcher(redis).run([("GET", _key(session_id))])
        if record is None:
            return None  # signed out, or expired
        data = orjson.loads(record)
        # A key removed from the callers ends its sessions.
        if not isinstance(data.get("k"), str) or self._callers.book.by_key_id(data["k"]) is None:
            return None
        return Session(session_id, data["k"], data["c"])

    def caller(self, session: Session) -> Caller | None:
        """The caller whose key signed the session in, as the callers file says now (its role
        may have changed since); None once the key is gone."""
        return self._callers.book.by_key_id(session.key_id)

    def caller_names(self) -> tuple[str, ...]:
        """Every caller's name, for an admin's caller filter."""
        return self._callers.book.names

    def caller_name(self, session: Session) -> str | None:
        """The name of the caller whose key signed the session in (for the audit)."""
        caller = self.caller(session)
        return caller.name if caller is not None else None

    async def end(self, redis: Redis, session: Session) -> None:
        await batcher(redis).run([("DEL", _key(session.id))])

    def set(self, response: Response, request: Request, session: Session) -> None:
        value = self._sessions.dumps(session.id)
        self._cookie(response, request, SESSION_COOKIE, value, SESSION_SECONDS)

    def set_login_token(self, response: Response, request: Request, token: str) -> None:
        """The sign-in form's token, in its own short-lived cookie (double submit)."""
        value = self._logins.dumps(token)
        self._cookie(response, request, LOGIN_COOKIE, value, LOGIN_SECONDS)

    def login_token_ok(self, request: Request, submitted: str) -> bool:
        token = _signed(request, LOGIN_COOKIE, self._logins, LOGIN_SECONDS)
        return isinstance(token, str) and hmac.compare_digest(token, submitted)

    def _cookie(
        self, response: Response, request: Request, name: str, value: str, max_age: int
    ) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path="/console",
            httponly=True,
            samesite="strict",
            secure=self._always_secure or request.url.scheme == "https",
        )


def _key(session_id: str) -> str:
    # Redis holds a digest: whoever reads Redis cannot present the cookie.
    return keys.console_session(hashlib.sha256(session_id.encode()).hexdigest())


def _signed(request: Request, name: str, serializer: URLSafeTimedSerializer, max_age: int) -> Any:
    """What cookie `name` holds, when its signature is good and it is younger than `max_age`."""
    raw = request.cookies.get(name)
    if raw is None:
        return None
    try:
        return serializer.loads(raw, max_age=max_age)
    except BadSignature:
        return None


def csrf_ok(session: Session, submitted: str) -> bool:
    return hmac.compare_digest(session.csrf.encode(), submitted.encode())


def clear(response: Response) -> None:
    for name in (SESSION_COOKIE, LOGIN_COOKIE):
        response.delete_cookie(name, path="/console", httponly=True, samesite="strict")
