"""Upload slots: how many uploads one API process runs at once, in total and per caller key.

An upload holds an upstream connection and a request for as long as the caller sends, which
may be an hour; without a cap one caller could take every slot and stall the rest. Beyond
the cap an upload is answered 429 with Retry-After before a byte of its body is read.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

from relay.errors import CLOSE, ApiError
from relay.metrics import UPLOADS_IN_PROGRESS

RETRY_AFTER = 5  # seconds: uploads are long, so a slot rarely frees sooner


class UploadSlots:
    def __init__(self, total: int, per_caller: int) -> None:
        self.total = total
        self.per_caller = per_caller
        self._held: Counter[str] = Counter()

    @property
    def in_use(self) -> int:
        return self._held.total()

    @contextlib.contextmanager
    def hold(self, caller: str) -> Iterator[None]:
        """One slot for `caller` while the block runs; ApiError 429 when none is free."""
        if self._held[caller] >= self.per_caller:
            raise _busy(f"this caller already has {self.per_caller} uploads in progress")
        if self.in_use >= self.total:
            raise _busy("the relay is running as many uploads as it takes")
        self._held[caller] += 1
        UPLOADS_IN_PROGRESS.inc()
        try:
            yield
        finally:
            UPLOADS_IN_PROGRESS.dec()
            self._held[caller] -= 1
            if not self._held[caller]:
                del self._held[caller]


def _busy(why: str) -> ApiError:
    return ApiError(
        429,
        f"too many concurrent uploads: {why}",
        headers={"retry-after": str(RETRY_AFTER), **CLOSE},
    )
