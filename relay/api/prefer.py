"""The `Prefer` request header (RFC 7240), of which the relay honours `wait`.

`Prefer: wait=N` asks that the answer wait up to N seconds for the job to end; `wait` alone
asks for as long as the relay allows (RELAY_MAX_WAIT, which also caps N). Preferences are
comma-separated, may carry `;` parameters, and may come in several `Prefer` headers; only the
first `wait` counts (RFC 7240 §2). Other preferences are ignored, as the RFC asks. A `wait`
value that is not a whole number of seconds is refused (400) rather than silently ignored:
the caller would otherwise not learn why nothing waited.
"""

from __future__ import annotations

from starlette.datastructures import Headers

from relay.errors import ApiError

HEADER = "prefer"
APPLIED = "preference-applied"
# The most digits a wait may have: past it the number is nonsense, and int() of it costly.
MAX_DIGITS = 9


def _preferences(headers: Headers) -> list[tuple[str, str | None]]:
    """(name, value) of each preference, in order; names lowercased, quotes removed."""
    found: list[tuple[str, str | None]] = []
    for header in headers.getlist(HEADER):
        for preference in header.split(","):
            head = preference.split(";", 1)[0].strip()
            if not head:
                continue
            name, equals, value = head.partition("=")
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            found.append((name.strip().lower(), value if equals else None))
    return found


def wait_seconds(headers: Headers, cap: int) -> int | None:
    """The seconds `Prefer: wait` asks for, at most `cap`; None when it is not asked for."""
    for name, value in _preferences(headers):
        if name != "wait":
            continue
        if value is None or value == "":
            return cap
        if not (value.isascii() and value.isdigit() and len(value) <= MAX_DIGITS):
            raise ApiError(400, "Prefer: wait must be a whole number of seconds, as in wait=30")
        return min(int(value), cap)
    return None


def applied(seconds: int) -> dict[str, str]:
    """The header that says the wait was honoured, and for how long at most."""
    return {APPLIED: f"wait={seconds}"}
