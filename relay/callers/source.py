"""The callers in force in a process: RELAY_CALLERS_FILE, re-read when it changes, or
RELAY_API_KEYS as one caller.

The file is mounted from a Kubernetes Secret, which changes by swapping a symlink: it is
looked at (one stat) at most every CHECK_EVERY seconds, on the next request that needs it,
and read again when its modification time, size or inode changed. A new file that cannot be
used is refused with a log line naming what is wrong (never a key), and the last good one
stays in force; at start-up there is no last good one, so a bad file stops the process.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import yaml

from relay.callers.model import CallerBook, CallersError, from_api_keys, read_callers
from relay.errors import ConfigError
from relay.settings import Settings

log = logging.getLogger(__name__)

# How often the file is looked at: a changed file is in force within this long of a request.
CHECK_EVERY = 1.0

Signature = tuple[int, int, int]


def load_file(path: Path) -> CallerBook:
    """Read and check a callers file: JSON when named .json, else YAML (JSON is YAML too)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CallersError(f"cannot be read ({type(exc).__name__})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        # The parsers' messages quote the offending text, which may be a key: only the place.
        mark = getattr(exc, "problem_mark", None)
        line = getattr(exc, "lineno", None) or (mark.line + 1 if mark is not None else None)
        where = f" near line {line}" if line is not None else ""
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise CallersError(f"is not valid {kind}{where}") from None
    return read_callers(data)


class CallerSource:
    """The book in force, kept current with the file."""

    def __init__(self, path: Path | None, book: CallerBook) -> None:
        self.path = path
        self._book = book
        self._signature = self._stat()
        self._checked = time.monotonic()

    @classmethod
    def from_settings(cls, settings: Settings) -> CallerSource:
        if settings.callers_file is None:
            return cls(None, from_api_keys(settings.api_keys))
        path = Path(settings.callers_file)
        try:
            return cls(path, load_file(path))
        except CallersError as exc:
            raise ConfigError("RELAY_CALLERS_FILE", str(exc)) from None

    @classmethod
    def fixed(cls, book: CallerBook) -> CallerSource:
        return cls(None, book)

    def _stat(self) -> Signature | None:
        if self.path is None:
            return None
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    @property
    def book(self) -> CallerBook:
        """The callers in force, re-read first when the file changed (checked every second)."""
        if self.path is not None and time.monotonic() - self._checked >= CHECK_EVERY:
            self.refresh()
        return self._book

    def refresh(self) -> bool:
        """Look at the file now; True when a changed, usable file was taken."""
        self._checked = time.monotonic()
        signature = self._stat()
        if signature == self._signature or self.path is None:
            return False
        self._signature = signature
        try:
            book = load_file(self.path)
        except CallersError as exc:
            log.error(
                "the changed callers file is refused, the last good one stays in force: %s",
                exc,
                extra={"callers_file": str(self.path)},
            )
            return False
        self._book = book
        log.info(
            "callers file re-read",
            extra={"callers_file": str(self.path), "callers": len(book.callers)},
        )
        return True
