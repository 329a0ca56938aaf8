"""API-key authentication: callers' keys and ApiKeyMiddleware before a tiny app on real HTTP."""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from relay.api.auth import ApiKeyMiddleware, authenticate
from relay.callers.model import Caller, CallerBook, from_api_keys
from relay.callers.source import CallerSource
from tests.servers import serve

KEY = "relay-key-0123456789abcdef"
OTHER_KEY = "second-key-for-rotation"
# Wrong keys that share all but their last bytes with KEY.
NEAR_MISSES = [
    KEY + "0",
    KEY[:-1],
    KEY[:-1] + "g",
    KEY + KEY,
    KEY.upper(),
]


@dataclass
class Protected:
    """The app behind the middleware: records what reaches it."""

    url: str = ""
    reached: list[str] = field(default_factory=list)
    lifespan_ran: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> Starlette:
        async def anything(request: Request) -> Response:
            body = await request.body()
            with self.lock:
                self.reached.append(request.url.path)
            return JSONResponse(
                {
                    "path": request.url.path,
                    "length": len(body),
                    "sha256": hashlib.sha256(body).hexdigest(),
                }
            )

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            self.lifespan_ran = True
            yield

        return Starlette(
            routes=[Route("/{path:path}", anything, methods=["GET", "POST"])],
            middleware=[
                Middleware(
                    ApiKeyMiddleware,
                    callers=CallerSource.fixed(
                        from_api_keys((SecretStr(KEY), SecretStr(OTHER_KEY)))
                    ),
                )
            ],
            lifespan=lifespan,
        )


@pytest.fixture(scope="module")
def server() -> Iterator[Protected]:
    protected = Protected()
    with serve(protected.app()) as url:
        protected.url = url
        yield protected


@pytest.fixture
def app(server: Protected) -> Protected:
    with server.lock:
        server.reached.clear()
    return server


def get(app: Protected, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.get(app.url + path, headers=headers or {})


def assert_refused(response: httpx.Response, app: Protected, message: str) -> None:
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/json"
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json() == {"error": message}
    assert app.reached == [], "a refused request never reaches the app"


# Accepted keys


@pytest.mark.parametrize("key", [KEY, OTHER_KEY])
def test_a_configured_key_in_x_api_key_is_accepted(app: Protected, key: str) -> None:
    response = get(app, "/api/v1/lipsync/requests", {"x-api-key": key})
    assert response.status_code == 200
    assert response.json()["path"] == "/api/v1/lipsync/requests"
    assert app.reached == ["/api/v1/lipsync/requests"]


@pytest.mark.parametrize(
    "authorization",
    [f"Bearer {KEY}", f"bearer {KEY}", f"BEARER {OTHER_KEY}", f"Bearer   {KEY}"],
)
def test_a_configured_key_as_bearer_token_is_accepted(app: Protected, authorization: str) -> None:
    response = get(app, "/api/v1/lipsync/requests/abc", {"authorization": authorization})
    assert response.status_code == 200
    assert app.reached == ["/api/v1/lipsync/requests/abc"]


def test_an_authorized_request_body_reaches_the_app_untouched(app: Protected) -> None:
    body = bytes(range(256)) * 8192  # 2 MiB, every byte value
    response = httpx.post(app.url + "/api/v1/upload", content=body, headers={"x-api-key": KEY})
    assert response.status_code == 200
    assert response.json()["length"] == len(body)
    assert response.json()["sha256"] == hashlib.sha256(body).hexdigest()


def test_the_lifespan_passes_through_the_middleware(app: Protected) -> None:
    assert app.lifespan_ran


# Refusals, with Chamelaion's messages


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "missing authorization header"),
        ({"x-api-key": "wrong-key"}, "unauthorized"),
        ({"authorization": f"Basic {KEY}"}, "invalid authorization format"),
        ({"authorization": KEY}, "invalid authorization format"),
        ({"authorization": "Bearer"}, "missing token"),
        ({"authorization": "Bearer wrong-key"}, "invalid token"),
        # x-api-key is what counts when both are sent, as at Chamelaion.
        ({"x-api-key": "wrong-key", "authorization": f"Bearer {KEY}"}, "unauthorized"),
    ],
)
def test_a_missing_or_wrong_key_is_refused(
    app: Protected, headers: dict[str, str], message: str
) -> None:
    assert_refused(get(app, "/api/v1/lipsync/requests", headers), app, message)


@pytest.mark.parametrize("candidate", NEAR_MISSES)
def test_a_key_differing_only_in_its_last_bytes_is_refused(app: Protected, candidate: str) -> None:
    assert_refused(get(app, "/api/v1/x", {"x-api-key": candidate}), app, "unauthorized")
    assert_refused(
        get(app, "/api/v1/x", {"authorization": f"Bearer {candidate}"}), app, "invalid token"
    )


@pytest.mark.parametrize(
    "headers",
    [
        {"x-api-key": "sk-live-CALLER-SECRET-4242"},
        {"authorization": "Bearer sk-live-CALLER-SECRET-4242"},
        {"authorization": "Token sk-live-CALLER-SECRET-4242"},
    ],
)
def test_a_refusal_never_echoes_the_key_it_was_given(
    app: Protected, headers: dict[str, str]
) -> None:
    response = get(app, "/api/v1/lipsync/requests", headers)
    assert response.status_code == 401
    assert "CALLER-SECRET" not in response.text
    assert all("CALLER-SECRET" not in value for value in response.headers.values())


# Which paths need a key


@pytest.mark.parametrize(
    "path", ["/healthz", "/readyz", "/metrics", "/openapi.json", "/", "/api", "/apiary/v1"]
)
def test_paths_outside_api_are_public(app: Protected, path: str) -> None:
    response = get(app, path)
    assert response.status_code == 200
    assert app.reached == [path]


@pytest.mark.parametrize("path", ["/api/", "/api/v1/lipsync/generate", "/api/openapi.json"])
def test_every_path_under_api_needs_a_key(app: Protected, path: str) -> None:
    assert_refused(get(app, path), app, "missing authorization header")


# The book of callers itself


def test_a_book_resolves_exactly_its_keys() -> None:
    book = from_api_keys((SecretStr(KEY), SecretStr(OTHER_KEY)))
    assert book.resolve(KEY) == book.resolve(OTHER_KEY) == book.named("default")
    for candidate in [*NEAR_MISSES, "", " " + KEY]:
        assert book.resolve(candidate) is None, candidate


def test_an_empty_book_or_empty_key_resolves_nothing() -> None:
    assert from_api_keys(()).resolve("") is None
    assert from_api_keys(()).resolve(KEY) is None
    assert from_api_keys((SecretStr(""),)).resolve("") is None, "an empty key is never a key"


def test_authenticate_reads_raw_asgi_headers() -> None:
    book = from_api_keys((SecretStr(KEY),))
    assert isinstance(authenticate(book, {b"x-api-key": KEY.encode()}), Caller)
    assert isinstance(authenticate(book, {b"authorization": f"Bearer {KEY}".encode()}), Caller)
    assert authenticate(book, {b"authorization": b"Bearer   "}) == "missing token"
    assert authenticate(book, {}) == "missing authorization header"
    assert authenticate(CallerBook([]), {b"x-api-key": KEY.encode()}) == "unauthorized"


def test_a_root_path_does_not_open_the_api() -> None:
    # Behind a proxy that strips a prefix, uvicorn's --root-path makes scope["path"] carry it
    # while Starlette routes on the path without it: the key check must look at the same path.
    protected = Protected()
    app = protected.app()

    async def with_root(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = {**scope, "root_path": "/relay", "path": "/relay" + scope["path"]}
        await app(scope, receive, send)

    with serve(with_root) as url:
        refused = httpx.get(url + "/api/v1/lipsync/requests/x")
        accepted = httpx.get(url + "/api/v1/lipsync/requests/x", headers={"x-api-key": KEY})
    assert refused.status_code == 401
    assert accepted.status_code == 200
    assert protected.reached == ["/relay/api/v1/lipsync/requests/x"]
