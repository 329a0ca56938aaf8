"""Logging set-up: one JSON object per line in production, short human lines in `relay dev`.

Fields passed with `extra=` (request_id, attempt, ...) become JSON keys. Nothing here formats a
secret: settings hold them as SecretStr, and callers log ids and outcomes, never headers or URLs.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Literal

import orjson

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(
    style: Literal["json", "text"], level: Literal["debug", "info", "warning", "error"] = "info"
) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if style == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    # Neither format prints where a record was made nor which thread or process made it, so
    # they are not gathered (the logging HOWTO's "Optimization"): about a third of the cost of
    # making a record.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # arq logs every job start and end at INFO; that is noise at this volume.
    logging.getLogger("arq").setLevel(logging.WARNING)
    # httpx logs every request with its full URL, and callback URLs may carry receivers' tokens.
    logging.getLogger("httpx").setLevel(logging.WARNING)
