"""Console sign-in: one of RELAY_API_KEYS, then a signed, expiring session cookie.

The cookie holds no key: only a short digest naming which configured key signed in (so removing
that key from RELAY_API_KEYS ends its sessions) and the session's CSRF token, signed with
itsdangerous and checked for age on every request. It is HttpOnly, SameSite=Strict, and Secure
when the console is served over https. Every state-changing form carries the CSRF token; the
sign-in form carries one too, from a short-lived cookie of its own (double submit).
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import Request
from starlette.responses import Response

from relay.api.auth import KeyRing, key_name
from relay.settings import Settings

SESSION_COOKIE = "relay_console"
LOGIN_COOKIE = "relay_console_login"
SESSION_SECONDS = 8 * 3600
LOGIN_SECONDS = 600


@dataclass(frozen=True)
class Session:
    key_id: str
    csrf: str


class Sessions:
    def __init__(self, settings: Settings) -> None:
        keys = [key.get_secret_value() for key in settings.api_keys]
        configured = settings.console_secret
        # Without its own secret the console derives one from the API keys, so every API
        # replica signs alike and rotating the keys ends every session.
        secret = (
            configured.get_secret_value()
            if configured is not None
            else hmac.new(b"relay-console", "\n".join(sorted(keys)).encode(), "sha256").hexdigest()
        )
        self._sessions = URLSafeTimedSerializer(secret, salt="relay-console-session")
        self._logins = URLSafeTimedSerializer(secret, salt="relay-console-login")
        self._ring = KeyRing(settings.api_keys)
        self._key_ids = {key_name(key.encode()) for key in keys}

    def sign_in(self, candidate: str) -> Session | None:
        if not self._ring.accepts(candidate):
            return None
        return Session(key_name(candidate.encode()), secrets.token_urlsafe(32))

    def read(self, request: Request) -> Session | None:
        data = _signed(request, SESSION_COOKIE, self._sessions, SESSION_SECONDS)
        if not isinstance(data, dict) or data.get("k") not in self._key_ids:
            return None
        csrf = data.get("c")
        return Session(data["k"], csrf) if isinstance(csrf, str) else None

    def set(self, response: Response, request: Request, session: Session) -> None:
        value = self._sessions.dumps({"k": session.key_id, "c": session.csrf})
        _cookie(response, request, SESSION_COOKIE, value, SESSION_SECONDS)

    def set_login_token(self, response: Response, request: Request, token: str) -> None:
        """The sign-in form's token, in its own short-lived cookie (double submit)."""
        _cookie(response, request, LOGIN_COOKIE, self._logins.dumps(token), LOGIN_SECONDS)

    def login_token_ok(self, request: Request, submitted: str) -> bool:
        token = _signed(request, LOGIN_COOKIE, self._logins, LOGIN_SECONDS)
        return isinstance(token, str) and hmac.compare_digest(token, submitted)


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


def _cookie(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/console",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def clear(response: Response) -> None:
    for name in (SESSION_COOKIE, LOGIN_COOKIE):
        response.delete_cookie(name, path="/console", httponly=True, samesite="strict")
