"""The console's pages: server-rendered HTML, a little JavaScript only for local times and the
chart's refresh."""

from __future__ import annotations

import contextlib
import logging
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
from relay.callers.model import NAME, Caller
from relay.callers.source import CallerSource
from relay.console import queries
from relay.console.chart import chart_svg
from relay.console.headers import ConsoleHeaders
from relay.console.session import Session, Sessions, clear, csrf_ok
from relay.delivery.store import DeliveryId
from relay.errors import ApiError
from relay.jobs.store import Job
from relay.redis import stats
from relay.redis.clock import redis_now
from relay.settings import Settings

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
FORM_LIMIT = 4096
# Deliveries looked at per state for a caller's failed page (picked out of everyone's newest).
FAILED_SCAN = 1000

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
                "viewer": self.sessions.caller(session) if session else None,
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
        signed = await self.sessions.sign_in(app_state(request).redis, form.get("key", ""))
        if signed is None:
            log.warning("console sign-in refused: not a caller's key")
            return self._login_page(
                request,
                error="That key is not one of RELAY_API_KEYS or of the callers file.",
                status=401,
            )
        session, caller = signed
        # Who signed in, by name (never the key): the console steers deliveries.
        log.info("console sign-in", extra={"caller": caller.name, "role": caller.role})
        response = _redirect(request.url_for("overview"))
        self.sessions.set(response, request, session)
        return response

    async def logout(self, request: Request) -> Response:
        session = await self._session(request)
        form = await _form(request)
        if not csrf_ok(session, form.get("csrf", "")):
            raise HTTPException(403, "missing or wrong CSRF token")
        await self.sessions.end(app_state(request).redis, session)
        log.info("console sign-out", extra={"caller": self.sessions.caller_name(session)})
        response = _redirect(request.url_for("login"))
        clear(response)
        return response

    def _viewer(self, session: Session) -> Caller:
        """The signed-in caller, as the callers file says now."""
        caller = self.sessions.caller(session)
        if caller is None:
            raise _SignIn()  # its key was removed meanwhile
        return caller

    def _owner(self, request: Request, session: Session) -> str | None:
        """Whose jobs a page shows: a caller's own; for an admin everyone's (None), or the one
        caller its `caller` filter names. A caller's own filter is ignored: not its choice."""
        viewer = self._viewer(session)
        if not viewer.admin:
            return viewer.name
        wanted = request.query_params.get("caller") or None
        if wanted is not None and not NAME.fullmatch(wanted):
            raise HTTPException(400, "The caller filter must be a caller's name.")
        return wanted

    async def _visible_job(self, request: Request, session: Session) -> Job:
        """The job the path names, if the signed-in caller may see it; 404 as for no job."""
        state: AppState = app_state(request)
        job = await state.store.get(request.path_params["id"][:256])
        viewer = self._viewer(session)
        if job is None or not (viewer.admin or job.caller == viewer.name):
            raise HTTPException(404, "No tracked job has this id. It may have expired.")
        return job

    async def _count(self, state: AppState, action: str, session: Session) -> None:
        """Count a redeliver or recover against the caller's allowance, the API's own."""
        caller = self.sessions.caller_name(session) or session.key_id
        try:
            await SteeringLimits(state.redis).count(allowance(state.settings, action), caller)
        except ApiError as exc:
            raise HTTPException(exc.status_code, exc.message, headers=exc.headers) from None

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
        session = await self._session(request)
        if not self._viewer(session).admin:
            # Every caller's callbacks: an admin's to see.
            raise HTTPException(404, "The callbacks chart is for admins.")
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
        owner = self._owner(request, session)
        if query:
            job = await state.store.find_owned(query[:256], owner)
            rows = await queries.job_rows(state.redis, [job.request_id]) if job else []
            page = queries.JobPage(rows, 0)
        else:
            page = await queries.list_jobs(
                state.redis,
                cursor=int(cursor_text),
                status=status,
                delivery=delivery,
                owner=owner,
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
            **self._caller_filter(session, owner),
        )

    def _caller_filter(self, session: Session, owner: str | None) -> dict[str, Any]:
        """What a page needs for its caller column and filter (an admin's only)."""
        viewer = self._viewer(session)
        return {
            "admin": viewer.admin,
            "caller": owner if viewer.admin else None,
            "callers": self.sessions.caller_names() if viewer.admin else (),
        }

    async def failed(self, request: Request) -> Response:
        session = await self._session(request)
        return await self._failed_page(request, session, outcome=None)

    async def _failed_page(
        self, request: Request, session: Session, *, outcome: dict[str, Any] | None
    ) -> Response:
        state = app_state(request)
        owner = self._owner(request, session)
        rows: list[dict[str, Any]] = []
        for wanted in ("failed", "failing", "gone"):
            # A caller's rows are picked out of everyone's newest: read more than a page.
            found = await state.attempt_log.page(
                wanted,
                since=0,
                until=float("inf"),
                limit=queries.PAGE_SIZE if owner is None else FAILED_SCAN,
            )
            request_ids = [DeliveryId.parse(delivery_id).request_id for delivery_id, _ in found]
            owners = await state.store.callers_of(request_ids)
            rows += [
                {
                    "delivery_id": delivery_id,
                    "request_id": request_id,
                    "state": wanted,
                    "since": since,
                    "caller": job_owner,
                }
                for (delivery_id, since), request_id, job_owner in zip(
                    found, request_ids, owners, strict=True
                )
                if owner is None or job_owner == owner
            ][: queries.PAGE_SIZE]
        rows.sort(key=lambda row: row["since"], reverse=True)
        seconds = int(await redis_now(state.redis))
        return self._page(
            request,
            "failed.html",
            session,
            rows=rows,
            outcome=outcome,
            default_since=iso(float(seconds) - 3600),
            **self._caller_filter(session, owner),
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
        await self._count(state, RECOVER, session)
        done = await state.redeliverer.recover(
            states=("failing", "failed"),
            since=since,
            limit=int(limit_text),
            owner=self._owner(request, session),
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
        job = await self._visible_job(request, session)
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
        await self._count(state, REDELIVER, session)
        job = await self._visible_job(request, session)
        done = await state.redeliverer.redeliver(
            job.request_id, note="redelivery requested", by=self.sessions.caller_name(session)
        )
        if done.refused is not None:
            raise HTTPException(409, "This job has no callback to send again yet.")
        url = request.url_for("job", id=job.request_id).include_query_params(
            redelivered=done.attempt
        )
        return _redirect(url)


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
