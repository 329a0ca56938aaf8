"""Which secrets sign a caller's callbacks: its own `webhook_secrets` when the callers file
gives it some, else the global RELAY_WEBHOOK_SECRETS.

With secrets of its own, a team's receivers hold only that team's secret, so none of them can
forge a callback another team accepts. Signers are built once per caller and rebuilt when the
callers file changes (relay.callers.source).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pydantic import SecretStr

from relay.callers.model import Caller, CallerBook
from relay.callers.source import CallerSource
from relay.signing import Signer


class CallerSigners:
    def __init__(
        self,
        callers: CallerSource,
        secrets: tuple[SecretStr, ...],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.callers = callers
        self._clock = clock
        # The global secrets' signer; None where a process has none (an API without them).
        self.default = Signer(secrets, clock) if secrets else None
        self._book: CallerBook | None = None
        self._own: dict[str, Signer] = {}

    def caller(self, name: str | None) -> Caller | None:
        """The caller in force by that name (None: no name, or no such caller any more)."""
        return self.callers.book.named(name) if name else None

    def signer(self, name: str | None) -> Signer | None:
        """The signer for the callbacks of caller `name` (a job's caller, or None)."""
        book = self.callers.book
        if book is not self._book:
            self._book, self._own = book, {}
        caller = book.named(name) if name else None
        if caller is None or not caller.webhook_secrets:
            return self.default
        signer = self._own.get(caller.name)
        if signer is None:
            signer = self._own[caller.name] = Signer(caller.webhook_secrets, self._clock)
        return signer

    def published(self) -> list[tuple[str | None, Signer]]:
        """Every signer whose public keys are published: the global one (caller None), then
        each caller's own, by name."""
        found: list[tuple[str | None, Signer]] = []
        if self.default is not None:
            found.append((None, self.default))
        for caller in self.callers.book.callers:
            if caller.webhook_secrets:
                signer = self.signer(caller.name)
                assert signer is not None
                found.append((caller.name, signer))
        return found
