"""POST /api/v1/lipsync/generate-with-media: the caller's upload, streamed through to Chamelaion.

Files of several GB are normal here, so nothing is held: each chunk read from the caller is
parsed (`MediaForm`), and what Chamelaion should get is written upstream before the next chunk
is read. The caller is read no faster than Chamelaion accepts, so memory stays flat whatever the
file size. Once Chamelaion answers, the job is tracked like any other (poll, signed callback).

What can be known before Chamelaion is contacted is checked first: the content type, a declared
size over RELAY_MAX_UPLOAD_BYTES, and every part before the first file (the official SDK sends
its fields, the relay's own `callback_url`, `callback_events` and `callback_metadata` included,
before the files). A problem found later, mid-stream,
aborts the upstream request before its closing delimiter, so Chamelaion never gets a complete
body and creates no job; the caller gets the relay's 4xx. So does a caller that disconnects.

Timeouts are per stall, not per request: a multi-GB upload may take an hour, but no transfer
may go `upstream_timeout` seconds without a byte moving (from the caller or into Chamelaion),
and Chamelaion gets as long again to answer once the last byte is sent. A caller that keeps
bytes moving but only just (a byte every few seconds) is held to RELAY_UPLOAD_MIN_RATE on
average over the time the relay spent waiting for it, after a first stall window of grace.

An upload holds one of the process's upload slots (`relay.api.limits`) and one of the
uploads' own upstream connections from start to end: other routes never wait behind it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal, TypeVar

import httpx
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from relay.api.auth import request_caller
from relay.api.body import declared_length, too_large
from relay.api.budget import SubmissionBudget
from relay.api.multipart import MediaForm, boundary_of, content_type
from relay.api.state import app_state
from relay.api.submit import (
    Submission,
    check_callback_url,
    ensure_store,
    held_idempotency_key,
)
from relay.errors import CLOSE, ApiError, UpstreamError
from relay.upstream import Upstream

log = logging.getLogger(__name__)

UPSTREAM_PATH = "v1/lipsync/generate-with-media"
PUSH_INTERVAL = 0.05  # seconds between moves of the stall deadline

Waiting = Literal["caller", "upstream", "answer"]
T = TypeVar("T")


class Upload:
    """One caller's body on its way upstream, with a watchdog that ends a stalled transfer."""

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        form: MediaForm,
        *,
        declared: int | None,
        limit: int,
        stall: float,
        min_rate: float,
        check_callback: Callable[[str], Awaitable[None]],
        before_end: Callable[[MediaForm], Awaitable[None]] | None = None,
    ) -> None:
        self.form = form
        self.problem: ApiError | None = None
        self._chunks = chunks
        self._declared = declared
        self._limit = limit
        self._stall = stall
        self._min_rate = min_rate
        self._caller_time = 0.0  # seconds spent waiting for the caller's bytes
        self._check_callback = check_callback
        self._before_end = before_end
        self._callback_checked = False
        self._received = 0
        self._exhausted = False
        self._complete = False
        self._ready: list[bytes] = []
        self._watchdog: asyncio.Timeout | None = None
        self._pushed = 0.0
        self._waiting: Waiting = "caller"

    async def send(self, upstream: Upstream) -> httpx.Response:
        """Forward the body and return Chamelaion's answer; ApiError for whatever went wrong."""
        try:
            async with asyncio.timeout(None) as self._watchdog:
                try:
                    response = await self._forward(upstream)
                finally:
                    self._watchdog = None
        except TimeoutError:
            raise self.problem or self._stalled() from None
        except ApiError as exc:
            # A problem raised inside the body reaches here as the transport's error: prefer it.
            raise self.problem or exc from None
        if response.is_success and not self._complete:
            raise UpstreamError(502, "Chamelaion accepted an upload it had not fully received")
        return response

    async def _forward(self, upstream: Upstream) -> httpx.Response:
        # Read up to the first file's bytes, so a bad start of the form never reaches upstream.
        while not self.form.streaming_file and await self._pull():
            pass
        headers = {"content-type": content_type(self.form.boundary)}
        if self._declared is not None:
            # Sized, not chunked: the bytes pass through unchanged, so the size is known, and
            # the transport then writes each chunk as it is instead of copying it into a frame.
            headers["content-length"] = str(self.form.promise(self._declared))
        return await upstream.request(
            "POST",
            UPSTREAM_PATH,
            content=self._body(),
            headers=headers,
            # Per operation, not per request: `read` bounds the wait for the answer (the
            # transport starts it once the body is sent); the watchdog bounds the writes.
            timeout=httpx.Timeout(self._stall, connect=min(self._stall, 10.0)),
            upload=True,
        )

    async def _body(self) -> AsyncIterator[bytes]:
        more = True
        while True:
            if not more and self._before_end is not None:
                # Chamelaion can create the job only once it has the closing delimiter, which
                # is among the bytes still to send: the submission's intent is written first.
                before_end, self._before_end = self._before_end, None
                try:
                    await before_end(self.form)
                except ApiError as exc:
                    self.problem = exc  # the request is aborted before its end: no job
                    raise
            if self._ready:
                ready, self._ready = self._ready, []
                self._progress("upstream")
                yield ready[0] if len(ready) == 1 else b"".join(ready)
            if not more:
                break
            more = await self._pull()
        self._complete = True
        self._progress("answer")

    async def _pull(self) -> bool:
        """Feed the caller's next chunk to the form; False once the body has ended."""
        if self._exhausted:
            return False
        self._progress("caller")
        waited_from = time.monotonic()
        try:
            chunk = await anext(self._chunks)
        except StopAsyncIteration:
            self._exhausted = True
            self._ready.append(self._checked(self.form.finish))
            return False
        except ClientDisconnect:
            log.info("caller disconnected mid-upload after %d bytes", self._received)
            self.problem = ApiError(400, "the caller disconnected before the upload was complete")
            raise self.problem from None
        self._received += len(chunk)
        if self._received > self._limit:
            self.problem = too_large(self._limit)
            raise self.problem
        self._caller_time += time.monotonic() - waited_from
        if self._received < self._min_rate * (self._caller_time - self._stall):
            log.info("upload abandoned: the caller sends slower than the minimum rate")
            self.problem = ApiError(
                408,
                f"upload too slow: less than {self._min_rate:g} bytes/s on average",
                headers=CLOSE,
            )
            raise self.problem
        self._ready += self._checked(lambda: self.form.feed(chunk))
        if self.form.callback_url is not None and not self._callback_checked:
            self._callback_checked = True
            try:
                await self._check_callback(self.form.callback_url)
            except ApiError as exc:
                self.problem = exc
                raise
        return True

    def _checked(self, step: Callable[[], T]) -> T:
        try:
            return step()
        except ApiError as exc:
            self.problem = exc
            raise

    def _progress(self, waiting: Waiting) -> None:
        self._waiting = waiting
        if self._watchdog is None:
            return
        # Re-arming the timer for every chunk (thousands a second) costs more CPU than parsing;
        # every PUSH_INTERVAL is free, and a deadline that much early does no harm.
        now = time.monotonic()
        if self._waiting == "answer" or now - self._pushed >= PUSH_INTERVAL:
            self._watchdog.reschedule(asyncio.get_running_loop().time() + self._stall)
            self._pushed = now

    def _stalled(self) -> ApiError:
        seconds = f"{self._stall:g} s"
        if self._waiting == "caller":
            log.info("upload abandoned: nothing from the caller for %s", seconds)
            return ApiError(408, f"upload stalled: nothing arrived for {seconds}", headers=CLOSE)
        if self._waiting == "upstream":
            return UpstreamError(504, f"Chamelaion stopped accepting the upload for {seconds}")
        return UpstreamError(504, "Chamelaion did not answer in time")


async def generate_with_media(request: Request) -> Response:
    state = app_state(request)
    limit = state.settings.max_upload_bytes
    form = MediaForm(boundary_of(request.headers.get("content-type", "")))
    declared = declared_length(request, limit)
    caller = request_caller(request)
    submission = Submission(
        state,
        reference_id=None,
        idempotency_key=held_idempotency_key(request),
        callback_url=None,
        caller=caller.name,
    )

    async def before_end(complete: MediaForm) -> None:
        # Every field is known once the body is: an upload's reference_id and the relay's own
        # fields may come after its files. (No reference_id is made up here as for JSON
        # submits: the multipart body passes through as the caller sent it.)
        options = complete.options
        submission.reference_id = complete.reference_id
        submission.callback_url = options.callback_url
        submission.events = options.callback_events
        submission.metadata = options.stored_metadata()
        await submission.open()

    with state.uploads.hold(caller.name):
        # Before a byte is read: a store that cannot record the job refuses the upload whole.
        await ensure_store(state)
        upload = Upload(
            request.stream(),
            form,
            declared=declared,
            limit=limit,
            stall=state.settings.upstream_timeout,
            min_rate=state.settings.upload_min_rate,
            check_callback=lambda url: check_callback_url(state, url, caller),
            before_end=before_end,
        )
        # Its create is a submission: held to the caller's limits as it books its slot.
        upstream = state.upstream.with_budget(SubmissionBudget(state.budget))
        return await submission.send(lambda: upload.send(upstream))
