"""Submitting a job: validate, check the callback URL, forward to Chamelaion, track it.

A submitted job is recorded in Redis before the caller hears "success": a job the caller knows
of is always a job the relay tracks. Both submit routes (JSON here, uploads in relay.api.uploads)
go through `Submission`, which writes an intent before the upstream create and settles an
answer that may hide a created job before answering (see relay.jobs.intents): the job is
adopted when it can be found for sure, and otherwise the caller is told that it may exist,
with `x-should-retry: false` so that the SDK does not create a second one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

import httpx
import orjson
from pydantic import ValidationError
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from relay.api.auth import request_caller
from relay.api.body import read_body
from relay.api.budget import acting_caller
from relay.api.models import MAX_ID_LENGTH, GenerateRequest
from relay.api.responses import JobCreated, json_bytes
from relay.api.state import AppState, app_state
from relay.callers.model import Caller
from relay.delivery.netpolicy import parse_callback_url, resolve_and_check
from relay.errors import ApiError, CallbackUrlRejected, NotReplicated, UpstreamError
from relay.jobs.intents import Intent, created_answer, lookup_timeout
from relay.metrics import INTENTS, JOBS_SUBMITTED, labelled
from relay.tracing import setup
from relay.upstream import BudgetRefused, check, json_object, may_have_arrived

log = logging.getLogger(__name__)

# Seconds before a worker first looks again for a job the API could not settle.
LOOK_AGAIN = 5.0


# The longest field name an error repeats: unknown fields are named by the caller, any length.
MAX_FIELD_CHARS = 100


def _field(location: tuple[int | str, ...]) -> str:
    name = ".".join(str(part) for part in location) or "body"
    return name if len(name) <= MAX_FIELD_CHARS else name[: MAX_FIELD_CHARS - 1] + "…"


def validation_error(exc: ValidationError) -> ApiError:
    details = [
        {"field": _field(error["loc"]), "message": error["msg"]}
        for error in exc.errors(include_url=False, include_input=False)
    ]
    first = details[0]
    return ApiError(422, f"invalid request: {first['field']}: {first['message']}", details=details)


async def generate(request: Request) -> Response:
    state = app_state(request)
    raw = await read_body(request, state.settings.max_body_bytes)
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        job = GenerateRequest.model_validate(parsed)
    except ValidationError as exc:
        raise validation_error(exc) from None
    await check_callback_url(state, job.callback_url, request_caller(request))
    body = job.upstream_body()
    idempotency_key = held_idempotency_key(request)
    if job.reference_id is None and idempotency_key is not None:
        # The only handle Chamelaion offers to find a job whose answer was lost: with an
        # Idempotency-Key and no reference_id of its own, the job gets one derived from the key.
        body["reference_id"] = derived_reference_id(idempotency_key)
    submission = Submission(
        state,
        reference_id=body.get("reference_id"),
        idempotency_key=idempotency_key,
        callback_url=job.callback_url,
        events=job.callback_events,
        metadata=job.stored_metadata(),
        caller=request_caller(request).name,
    )
    # The intent is the write that proves the store takes writes (no separate check); the
    # create's budget slot is booked with it.
    await submission.open(book=True)
    return await submission.send(
        lambda: state.upstream.request("POST", "v1/lipsync/generate", json=body, spent=True)
    )


def held_idempotency_key(request: Request) -> str | None:
    """The Redis key of the Idempotency-Key record this request holds (relay.api.idempotency)."""
    key: str | None = request.scope.get("state", {}).get("idempotency_key")
    return key


def derived_reference_id(idempotency_key: str) -> str:
    return "relay-idem-" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]


class OutcomeUnknown(UpstreamError):
    """A create whose outcome the relay could not settle before answering.

    Never worth an automatic retry (`x-should-retry: false`): the job may exist, and a retry
    would create a second one. `code` is machine-readable (in `details`). `pending`: the intent
    is left to the workers' reconcile, which may still find and track the job; an
    Idempotency-Key stays held until then.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        pending: bool,
        request_ids: Sequence[str] = (),
    ) -> None:
        detail: dict[str, object] = {"code": code}
        if request_ids:
            detail["request_ids"] = list(request_ids)
        super().__init__(status, message, details=[detail], headers={"x-should-retry": "false"})
        self.code = code
        self.pending = pending


def _request_id(response: httpx.Response) -> str | None:
    answer = json_object(response.content)
    request_id = answer.get("request_id") if answer is not None else None
    if isinstance(request_id, str) and 0 < len(request_id) <= MAX_ID_LENGTH:
        return request_id
    return None


@dataclass
class Submission:
    """One create sent to Chamelaion, from its intent to a tracked job (or an honest error).

    Both submit routes (JSON here, uploads in relay.api.uploads) go through it. The intent is
    written before the upstream call; a clear answer either way removes it. An answer that may
    hide a created job (a timeout or a connection lost after sending, a 5xx, a 2xx without a
    request id) is resolved before the caller hears anything: the job is looked for by
    reference_id and adopted when exactly one row can be it (relay.jobs.intents says when).
    A process cut off mid-call (SIGKILL, a shutdown past its grace) leaves the intent to the
    workers' reconcile.
    """

    state: AppState
    reference_id: str | None
    idempotency_key: str | None
    callback_url: str | None
    events: Sequence[str] | None = None
    metadata: bytes | None = None
    intent: Intent | None = None
    caller: str | None = None  # whose job it becomes (relay.callers)

    async def open(self, *, book: bool = False) -> None:
        """Write the intent. `book`: also book the create's slot of the shared upstream budget
        in the same round trip (the create is then sent with `spent=True`); refused, the
        intent is closed and the caller gets the budget's 429."""
        budget = self.state.budget
        try:
            self.intent, booking = await self.state.intents.open(
                reference_id=self.reference_id,
                idempotency_key=self.idempotency_key,
                callback_url=self.callback_url,
                events=self.events,
                metadata=self.metadata,
                caller=self.caller,
                along=[budget.take_call(submission=True)] if book else [],
            )
        except RedisError:
            raise ApiError(503, "the relay's job store is unavailable; try again") from None
        if book:
            try:
                await budget.use_booking(booking[0])
            except BudgetRefused:
                await self._close()  # nothing was sent
                raise

    async def send(self, call: Callable[[], Awaitable[httpx.Response]]) -> Response:
        """Make the upstream create with `call` and settle its outcome."""
        try:
            response = await call()
        except UpstreamError as exc:
            if self.intent is None or not may_have_arrived(exc):
                await self._close()
                raise
            return await self._resolve(exc.message, answered=False)
        except ApiError:
            await self._close()  # the caller's own problem: nothing reached Chamelaion whole
            raise
        if self.intent is None:
            # An upload answered before its last bytes were sent: no job can exist (a success
            # is refused by the upload itself).
            check(response)
        if response.is_success:
            request_id = _request_id(response)
            if request_id is None:
                # A success, so the job may well exist: never "not created", whatever the
                # lookup finds.
                return await self._resolve(
                    "Chamelaion accepted the job but sent no usable request_id", answered=False
                )
            return await self._track(request_id, response.content)
        try:
            check(response)
        except UpstreamError as exc:
            if response.status_code < 500:
                await self._close()  # refused as sent (4xx, 429): no job
                raise
            return await self._resolve(exc.message, answered=True)
        raise AssertionError("check() passes only 2xx answers")  # pragma: no cover

    async def _close(self) -> None:
        if self.intent is not None:
            # A leftover intent is dropped by the reconcile (nothing to adopt): no harm.
            with contextlib.suppress(RedisError):
                await self.state.intents.close(self.intent)

    async def _track(self, request_id: str, answer: bytes) -> Response:
        try:
            created = await self.state.store.create(
                request_id,
                callback_url=self.callback_url,
                reference_id=self.reference_id,
                first_poll_in=self.state.settings.poll_min_interval,
                events=self.events,
                metadata=self.metadata,
                intent_id=self.intent.id if self.intent is not None else None,
                caller=self.caller,
                # The submission span's context (relay.api.traced), for the job's own spans.
                trace=tracer.keep() if (tracer := setup.active()) is not None else None,
            )
        except NotReplicated:
            raise  # recorded on the primary (its intent closed with it): tracked from there
        except RedisError:
            log.error(
                "Chamelaion accepted %s but it could not be recorded",
                request_id,
                extra={"request_id": request_id},
            )
            raise self._unrecorded(request_id) from None
        if created:
            labelled(JOBS_SUBMITTED, acting_caller().name).inc()
            # The common case, counted in metrics: not a line each unless RELAY_LOG_LEVEL=debug
            # (at a thousand submissions a second, a line each is a sizeable share of the CPU).
            log.debug("job submitted", extra={"request_id": request_id})
            return JobCreated(answer, request_id)
        return json_bytes(answer)

    def _unrecorded(self, request_id: str) -> OutcomeUnknown:
        message = (
            f"Chamelaion created job {request_id}, but the relay's job store refused to record "
            "it. Do not resubmit: it would create a second job. "
        )
        if self.reference_id is None:
            # Nothing to find it by later: the intent is of no use.
            message += (
                "Without a reference_id the relay cannot find it again by itself: watch it "
                "(POST /api/relay/v1/watches) once the store is back, to get its callback."
            )
            INTENTS.labels("unrecorded_unfindable").inc()
        else:
            message += (
                "A worker records it (and sends its callback) once the store takes writes again."
            )
            INTENTS.labels("unrecorded").inc()
        return OutcomeUnknown(
            503, message, code="job_not_recorded", pending=self.reference_id is not None
        )

    async def _resolve(self, reason: str, *, answered: bool) -> Response:
        """Chamelaion's answer may hide a created job: find it, or say what is known."""
        intent = self.intent
        assert intent is not None
        if intent.reference_id is None:
            await self._close()
            INTENTS.labels("unfindable").inc()
            log.warning(
                "a create's answer was lost and the submission has no reference_id: its job, if "
                "created, runs untracked",
                extra={"reason": reason},
            )
            raise OutcomeUnknown(
                502,
                f"{reason}. The job may exist at Chamelaion, and the relay cannot look for it: "
                "this submission carried neither a reference_id nor an Idempotency-Key. "
                "Resubmitting may create a second job.",
                code="upstream_outcome_unknown",
                pending=False,
            )
        try:
            found = await self.state.intents.look(
                intent, self.state.upstream, timeout=lookup_timeout(self.state.settings)
            )
        except UpstreamError as exc:
            return await self._leave_to_reconcile(
                reason, f"looking for the job failed too ({exc.message})"
            )
        if found.adoptable is not None:
            try:
                adopted = await self.state.intents.adopt(intent, found.adoptable)
            except RedisError:
                raise self._unrecorded(found.adoptable) from None
            if adopted:
                INTENTS.labels("adopted").inc()
                log.warning(
                    "a create's answer was lost; its job was found and is tracked",
                    extra={"request_id": found.adoptable, "reason": reason},
                )
                labelled(JOBS_SUBMITTED, acting_caller().name).inc()
                return json_bytes(created_answer(found.adoptable))
            found = replace(found, rivals=found.rivals + 1)  # tracked meanwhile by another
        if len(found.candidates) > 1 or (found.candidates and not found.rivals):
            await self._close()
            INTENTS.labels("ambiguous").inc()
            log.warning(
                "a create's answer was lost and several requests could be its job; none tracked",
                extra={"request_ids": found.candidates, "reason": reason},
            )
            raise OutcomeUnknown(
                502,
                f"{reason}. Chamelaion holds {len(found.candidates)} untracked requests with "
                f"reference_id {intent.reference_id!r} that this submission could have created: "
                f"{', '.join(found.candidates)}. The relay cannot tell which, if any, is this one, "
                "so it tracks none: look them up (GET /api/v1/lipsync/requests/{id}) and watch "
                "the right one (POST /api/relay/v1/watches); a resubmission may create another.",
                code="upstream_outcome_ambiguous",
                pending=False,
                request_ids=found.candidates,
            )
        if found.candidates:
            return await self._leave_to_reconcile(
                reason,
                "a job was found, but another submission with the same reference_id is in flight "
                "and the relay cannot tell yet whose it is",
            )
        if answered:
            # Chamelaion answered an error and lists no such job: it was not created, and a
            # retry is safe. The intent stays with the reconcile all the same, in case the job
            # shows up late (a gateway's 5xx while Chamelaion carried on).
            with contextlib.suppress(RedisError):
                await self.state.intents.leave_to_reconcile(intent, after=LOOK_AGAIN)
            raise UpstreamError(
                502,
                f"{reason} (no job with reference_id {intent.reference_id!r} was created; a "
                "retry will not duplicate one)",
            )
        return await self._leave_to_reconcile(reason, "no job was found yet")

    async def _leave_to_reconcile(self, reason: str, detail: str) -> Response:
        intent = self.intent
        assert intent is not None
        with contextlib.suppress(RedisError):  # it falls due for the reconcile anyway
            await self.state.intents.leave_to_reconcile(intent, after=LOOK_AGAIN)
        INTENTS.labels("handed_over").inc()  # the label predates the verb: dashboards use it
        raise OutcomeUnknown(
            502,
            f"{reason}; {detail}. The job may exist at Chamelaion: the relay keeps looking for "
            f"it by reference_id {intent.reference_id!r} for "
            f"{self.state.settings.intent_window:g} s and, if it appears, tracks it and sends "
            "its callback. Do not resubmit before then: it could create a second job.",
            code="upstream_outcome_unknown",
            pending=True,
        )


async def check_callback_url(
    state: AppState, callback_url: str | None, caller: Caller, *, field: str = "callback_url"
) -> None:
    """Refuse (422) a callback URL whose host is not one of the caller's `callback_hosts`, or
    is, or resolves into, a refused network.

    This is early feedback for the caller; delivery checks both again, since DNS answers and
    the callers file can change in between.
    """
    if callback_url is not None:
        parsed = parse_callback_url(callback_url)
        if not caller.allows_host(parsed.host):
            raise CallbackUrlRejected(
                f"its host is not one of this caller's callback_hosts "
                f"({', '.join(caller.callback_hosts)})"
            )
        # An IP literal is checked without resolving; a name is resolved every time.
        await resolve_and_check(parsed, state.policy)


async def ensure_store(state: AppState) -> None:
    # Refuse before Chamelaion creates a job the relay could not then record.
    try:
        await state.write_check.ensure_writable()
    except RedisError:
        raise ApiError(503, "the relay's job store is unavailable; try again") from None
