"""The console's pages: server-rendered HTML, a little JavaScript only for local times and the
chart's refresh."""

from __future__ import annotations

import contextlib
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import orjson
from jinja2 import pass_context
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.datastructures import URL
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from relay.api.deliveries import deliveries_of, iso, parse_time
from relay.api.state import AppState, app_state
from relay.api.steering_limits import RECOVER, REDELIVER, SteeringLimits, allowance
from relay.callers.source import CallerSource
from relay.console import queries
from relay.console.chart import chart_svg
from relay.console.headers import ConsoleHeaders
from relay.console.session import Session, Sessions, clear, csrf_ok
from relay.delivery.store import DeliveryId
from relay.errors import ApiError
from relay.redis import stats
from relay.redis.clock import redis_now
from relay.settings import Settings

HERE = Path(__file__).parent
FORM_LIMIT = 4096

templates = Jinja2Templates(directory=HERE / "templates")


def _path(url: URL) -> str:
    """`url` without its scheme and host: a redirect or link that stays on whatever scheme
    and host the browser used (behind a TLS proxy, https), whatever the API was told."""
    return f"{url.path}?{url.query}" if url.query else url.path


@pass_context
def _url_for(context: dict[str, Any], name: str, /, **path_params: Any) -> str:
    request: Request = context["request"]
    return _path(request.url_for(name, **path_params))


templates.env.filters["iso"] = iso
templates.env.globals["url_for"] = _url_for


def _redirect(url: URL) -> Response:
    return RedirectResponse(_path(url), 303)


async def _form(request: Request) -> dict[str, str]:
    """A small urlencoded form (the console's own); nothing else is accepted."""
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    if kind not in ("", "application/x-www-form-urlencoded"):
        raise HTTPException(415, "The console takes only its own forms.")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > FORM_LIMIT:
            raise HTTPException(413, "form too large")
    return {name: values[0] for name, values in parse_qs(body.decode("latin-1")).items()}


class Console:
    def __init__(self, settings: Settings, callers: CallerSource) -> None:
        self.sessions = Sessions(settings, callers)
        self.settings = settings

    async def _session(self, request: Request) -> Session:
        session = await self.sessions.read(app_state(request).redis, request)
        if session is None:
            raise _SignIn()
        return session

    async def _session_if_any(self, request: Request) -> Session | None:
        """For error pages: the session when it can be read, else none (the store may be down)."""
        with contextlib.suppress(RedisError):
            return await self.sessions.read(app_state(request).redis, request)
        return None

    def _page(
        self, request: Request, template: str, session: Session | None, **context: Any
    ) -> Response:
        return templates.TemplateResponse(
            request,
            template,
            {
                "csrf": session.csrf if session else None,
                "signed_in": session is not None,
                **context,
            },
            headers={"cache-control": "no-store"},
        )

    def _login_page(self, request: Request, *, error: str | None, status: int) -> Response:
        token = secrets.token_urlsafe(32)
        page = self._page(request, "login.html", None, error=error, token=token)
        page.status_code = status
        self.sessions.set_login_token(page, request, token)
        return page

    async def login_form(self, request: Request) -> Response:
        if await self.sessions.read(app_state(request).redis, request) is not None:
            return _redirect(request.url_for("overview"))
        return self._login_page(request, error=None, status=200)

    async def login(self, request: Request) -> Response:
        form = await _form(request)
        if not self.sessions.login_token_ok(request, form.get("token", "")):
            return self._login_page(
                request, error="The sign-in form expired; try again.", status=403
            )
        session = await self.sessions.sign_in(app_state(request).redis, form.get("key", ""))
        if session is None:
            return self._login_page(
                request, error="That key is not one of RELAY_API_KEYS.", status=401
            )
        response = _redirect(request.url_for("overview"))
        self.sessions.set(response, request, session)
        return response

    async def logout(self, request: Request) -> Response:
        session = await self._session(request)
        form = await _form(request)
        if not csrf_ok(session, form.get("csrf", "")):
            raise HTTPException(403, "missing or wrong CSRF token")
        await self.sessions.end(app_state(request).redis, session)
        response = _redirect(request.url_for("login"))
        clear(response)
        return response

    async def overview(self, request: Request) -> Response:
        session = await self._session(request)
        state = app_state(request)
        data = await queries.overview(state.redis, self.settings.upstream_rate_limit)
        chart = await stats.last_hour(state.redis)
        return self._page(
            request,
            "overview.html",
            session,
            overview=data,
            chart=chart_svg(chart),
            totals={name: sum(values) for name, values in chart.items()},
        )

    async def chart(self, request: Request) -> Response:
        await self._session(request)
        chart = await stats.last_hour(app_state(request).redis)
        return Response(
            chart_svg(chart), media_type="image/svg+xml", headers={"cache-control": "no-store"}
        )

    async def jobs(self, request: Request) -> Response:
        session = await self._session(request)
        state = app_state(request)
        query = request.query_params.get("q", "").strip()
        status = request.query_params.get("status") or None
        delivery = request.query_params.get("delivery") or None
        if delivery is not None and delivery not in queries.DELIVERY_STATES:
            raise HTTPException(400, "unknown delivery state")
        cursor_text = request.query_params.get("cursor", "0")
        if not (cursor_text.isascii() and cursor_text.isdigit()):
            raise HTTPException(400, "bad page cursor")
        if query:
            job = await state.store.find(query[:256])
            rows = await queries.job_rows(state.redis, [job.request_id]) if job else []
            page = queries.JobPage(rows, 0)
        else:
            page = await queries.list_jobs(
                state.redis, cursor=int(cursor_text), status=status, delivery=delivery
            )
        return self._page(
            request,
            "jobs.html",
            session,
            page=page,
            q=query,
            status=status or "",
            delivery=delivery or "",
            delivery_states=queries.DELIVERY_STATES,
            title="Jobs",
        )

    async def failed(self, request: Request) -> Response:
        session = await self._session(request)
        return await self._failed_page(request, session, outcome=None)

    async def _failed_page(
        self, request: Request, session: Session, *, outcome: dict[str, Any] | None
    ) -> Response:
        state = app_state(request)
        rows = []
        for wanted in ("failed", "failing", "gone"):
            found = await state.attempt_log.page(
                wanted, since=0, until=float("inf"), limit=queries.PAGE_SIZE
            )
            rows += [
                {
                    "delivery_id": delivery_id,
                    "request_id": DeliveryId.parse(delivery_id).request_id,
                    "state": wanted,
                    "since": since,
                }
                for delivery_id, since in found
            ]
        rows.sort(key=lambda row: row["since"], reverse=True)
        seconds = int(await redis_now(state.redis))
        return self._page(
            request,
            "failed.html",
            session,
            rows=rows,
            outcome=outcome,
            default_since=iso(float(seconds) - 3600),
        )

    async def recover(self, request: Request) -> Response:
        session = await self._session(request)
        form = await _form(request)
        if not csrf_ok(session, form.get("csrf", "")):
            raise HTTPException(403, "missing or wrong CSRF token")
        try:
            since = parse_time(form.get("since", ""), "since")
        except ApiError as exc:
            raise HTTPException(400, exc.message) from None
        limit_text = form.get("limit", "100")
        if not (limit_text.isascii() and limit_text.isdigit()) or not 1 <= int(limit_text) <= 1000:
            raise HTTPException(400, "The limit must be a whole number from 1 to 1000.")
        state = app_state(request)
        await _count(state, RECOVER, self.sessions.caller_name(session) or session.key_id)
        done = await state.redeliverer.recover(
            states=("failing", "failed"),
            since=since,
            limit=int(limit_text),
            by=self.sessions.caller_name(session),
        )
        outcome = {
            "requeued": done.requeued,
            "already_pending": done.already_pending,
            "more": done.more,
            "since": iso(since),
        }
        return await self._failed_page(request, session, outcome=outcome)

    async def job(self, request: Request) -> Response:
        session = await self._session(request)
        state: AppState = app_state(request)
        job = await state.store.get(request.path_params["id"][:256])
        if job is None:
            raise HTTPException(404, "No tracked job has this id. It may have expired.")
        body = orjson.loads(job.body) if job.body else None
        pretty = orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() if body else None
        return self._page(
            request,
            "job.html",
            session,
            job=job,
            body=pretty,
            deliveries=await deliveries_of(state, job),
            audit=await state.audit.entries(job.request_id),
            redelivered=request.query_params.get("redelivered"),
        )

    async def redeliver(self, request: Request) -> Response:
        session = await self._session(request)
        form = await _form(request)
        if not csrf_ok(session, form.get("csrf", "")):
            raise HTTPException(403, "missing or wrong CSRF token")
        if form.get("confirm") != "yes":
            raise HTTPException(400, "Tick the box to confirm the redelivery.")
        state = app_state(request)
        await _count(state, REDELIVER, self.sessions.caller_name(session) or session.key_id)
        job = await state.store.get(request.path_params["id"][:256])
        if job is None:
            raise HTTPException(404, "No tracked job has this id. It may have expired.")
        done = await state.redeliverer.redeliver(
            job.request_id, note="redelivery requested", by=self.sessions.caller_name(session)
        )
        if done.refused is not None:
            raise HTTPException(409, "This job has no callback to send again yet.")
        url = request.url_for("job", id=job.request_id).include_query_params(
            redelivered=done.attempt
        )
        return _redirect(url)


async def _count(state: AppState, action: str, caller: str) -> None:
    """Count a redeliver or recover against the same per-caller allowance as the API's (the
    caller whose key signed the session in)."""
    try:
        await SteeringLimits(state.redis).count(allowance(state.settings, action), caller)
    except ApiError as exc:
        raise HTTPException(exc.status_code, exc.message, headers=exc.headers) from None


class _SignIn(Exception):
    """Raised by a page that needs a session: answered with a redirect to the sign-in form."""


def create_console(settings: Settings, callers: CallerSource) -> Mount:
    console = Console(settings, callers)

    async def to_sign_in(request: Request, exc: Exception) -> Response:
        return _redirect(request.url_for("login"))

    async def error_page(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        session = await console._session_if_any(request)
        page = console._page(request, "error.html", session, message=exc.detail)
        page.status_code = exc.status_code
        return page

    async def store_down(request: Request, exc: Exception) -> Response:
        page = console._page(
            request,
            "error.html",
            None,
            message="Redis is unreachable; the relay's state cannot be read.",
        )
        page.status_code = 503
        return page

    app = Starlette(
        routes=[
            Route("/", console.overview, name="overview"),
            Route("/chart.svg", console.chart, name="chart"),
            Route("/login", console.login_form, methods=["GET"], name="login"),
            Route("/login", console.login, methods=["POST"]),
            Route("/logout", console.logout, methods=["POST"], name="logout"),
            Route("/jobs", console.jobs, name="jobs"),
            Route("/jobs/{id}", console.job, name="job"),
            Route("/jobs/{id}/redeliver", console.redeliver, methods=["POST"], name="redeliver"),
            Route("/deliveries/failed", console.failed, name="failed"),
            Route("/deliveries/recover", console.recover, methods=["POST"], name="recover"),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ],
        exception_handlers={
            _SignIn: to_sign_in,
            HTTPException: error_page,
            RedisError: store_down,
        },
        middleware=[Middleware(ConsoleHeaders)],
    )
    return Mount("/console", app=app)
