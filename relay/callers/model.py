"""What a caller is, and a callers file's contents read into a `CallerBook`.

A caller is one service (a team) using the relay: its name (recorded on every job it submits),
its keys, its role (`caller` sees and steers its own jobs; `admin` all of them), and what it
may set apart from the global settings: its own webhook signing secrets, the hosts its
callbacks may go to, and its limits (share, max_outstanding, submit_rate; None where the
global setting applies).

Keys are held only as SHA-256 digests, and a presented key is compared with every digest of
every caller with hmac.compare_digest: the time taken depends neither on how much of a key
matched, nor on which key or caller it is. No message here ever quotes a key or a secret.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Literal

from pydantic import SecretStr

from relay.settings import MIN_API_KEY_LENGTH
from relay.signing import check_secret

Role = Literal["caller", "admin"]
ROLES: tuple[Role, ...] = ("caller", "admin")

# Names go into Redis keys, log lines and metric labels: short, and no separator of any.
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
NAME = re.compile(NAME_PATTERN)
DIGEST_PREFIX = "sha256:"
DIGEST = re.compile(r"[0-9a-f]{64}")
# A callback host pattern: a DNS name or address, with `*` standing for one or more labels.
HOST_PATTERN = re.compile(r"[a-z0-9*]([a-z0-9*.:\[\]-]{0,252})")

# The caller RELAY_API_KEYS stands for when there is no callers file: the one team that runs
# the relay, an admin as every key was before callers existed.
DEFAULT_CALLER = "default"

FIELDS = frozenset(
    {
        "name",
        "keys",
        "role",
        "webhook_secrets",
        "callback_hosts",
        "share",
        "max_outstanding",
        "submit_rate",
    }
)


class CallersError(ValueError):
    """A callers file that cannot be used; the message names what is wrong, never a key."""


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_id(digest: bytes) -> str:
    """A short name for a key that does not reveal it (console sessions name their key so)."""
    return digest.hex()[:16]


@dataclass(frozen=True)
class Caller:
    name: str
    role: Role = "caller"
    # Its own signing secrets (empty: the global RELAY_WEBHOOK_SECRETS sign its callbacks).
    webhook_secrets: tuple[SecretStr, ...] = ()
    # Hosts its callback URLs may name, as globs (empty: any the network policy allows).
    callback_hosts: tuple[str, ...] = ()
    share: float = 1.0
    max_outstanding: int | None = None
    submit_rate: float | None = None
    # Its keys' digests (never the keys).
    key_digests: tuple[bytes, ...] = field(default=(), repr=False)

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    def allows_host(self, host: str) -> bool:
        """Whether a callback to `host` is this caller's to ask for (callback_hosts)."""
        if not self.callback_hosts:
            return True
        host = host.lower().rstrip(".")
        return any(fnmatchcase(host, pattern) for pattern in self.callback_hosts)


class CallerBook:
    """Every caller, and which one a key belongs to."""

    def __init__(self, callers: Sequence[Caller]) -> None:
        self.callers: tuple[Caller, ...] = tuple(callers)
        self._by_name = {caller.name: caller for caller in self.callers}
        self._keys = [(digest, caller) for caller in self.callers for digest in caller.key_digests]
        self._by_key_id = {key_id(digest): caller for digest, caller in self._keys}

    def resolve(self, candidate: str) -> Caller | None:
        """The caller whose key `candidate` is, or None. Every digest is compared, always."""
        digest = key_digest(candidate)
        found: Caller | None = None
        for known, caller in self._keys:
            if hmac.compare_digest(digest, known):
                found = caller
        return found if candidate else None

    def named(self, name: str) -> Caller | None:
        return self._by_name.get(name)

    def by_key_id(self, name: str) -> Caller | None:
        """The caller holding the key `key_id` names (a console session's key)."""
        return self._by_key_id.get(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    def fingerprint(self) -> bytes:
        """A digest of every key, for what must change when the keys do (console signing)."""
        return hashlib.sha256(b"".join(sorted(digest for digest, _ in self._keys))).digest()


def from_api_keys(keys: Sequence[SecretStr]) -> CallerBook:
    """RELAY_API_KEYS as one caller, `default`, an admin (settings checked their length)."""
    digests = tuple(key_digest(key.get_secret_value()) for key in keys)
    return CallerBook([Caller(DEFAULT_CALLER, "admin", key_digests=digests)] if digests else [])


def read_callers(data: object) -> CallerBook:
    """A callers file's parsed contents (JSON or YAML) as a book; CallersError when unusable."""
    if not isinstance(data, Mapping) or set(data) != {"callers"}:
        raise CallersError('the file must be an object with one field, "callers"')
    entries = data["callers"]
    if not isinstance(entries, list) or not entries:
        raise CallersError('"callers" must be a non-empty list')
    callers: list[Caller] = []
    seen_names: set[str] = set()
    seen_keys: set[bytes] = set()
    for position, entry in enumerate(entries, start=1):
        caller = _caller(position, entry)
        where = f"caller {caller.name!r}"
        if caller.name in seen_names:
            raise CallersError(f"{where}: the name is used twice")
        seen_names.add(caller.name)
        for digest in caller.key_digests:
            if digest in seen_keys:
                raise CallersError(f"{where}: a key is listed twice (keys must be unique)")
            seen_keys.add(digest)
        callers.append(caller)
    return CallerBook(callers)


def _caller(position: int, entry: object) -> Caller:
    where = f"caller #{position}"
    if not isinstance(entry, Mapping):
        raise CallersError(f"{where}: must be an object")
    name = entry.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise CallersError(
            f"{where}: name is required: 1-63 of a-z, 0-9, '-' and '_', starting with a letter "
            "or digit"
        )
    where = f"caller {name!r}"
    unknown = sorted(str(key) for key in entry if key not in FIELDS)
    if unknown:
        raise CallersError(f"{where}: unknown field(s) {', '.join(unknown)[:200]}")
    role = entry.get("role", "caller")
    if role not in ROLES:
        raise CallersError(f"{where}: role must be one of {', '.join(ROLES)}")
    return Caller(
        name=name,
        role=role,
        key_digests=_keys(where, entry.get("keys")),
        webhook_secrets=_secrets(where, entry.get("webhook_secrets")),
        callback_hosts=_hosts(where, entry.get("callback_hosts")),
        share=_number(where, entry, "share") or 1.0,
        max_outstanding=_optional_int(where, entry, "max_outstanding"),
        submit_rate=_number(where, entry, "submit_rate"),
    )


def _strings(where: str, name: str, value: object) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise CallersError(f"{where}: {name} must be a list of strings")
    return list(value)


def _keys(where: str, value: object) -> tuple[bytes, ...]:
    keys = _strings(where, "keys", value)
    if not keys:
        raise CallersError(f"{where}: keys must list at least one key")
    digests = []
    for position, key in enumerate(keys, start=1):
        if key.startswith(DIGEST_PREFIX):
            digest = key.removeprefix(DIGEST_PREFIX).lower()
            if not DIGEST.fullmatch(digest):
                raise CallersError(
                    f"{where}: key #{position} is not sha256: and 64 hex digits "
                    "(`printf %s KEY | sha256sum`)"
                )
            digests.append(bytes.fromhex(digest))
        elif len(key) < MIN_API_KEY_LENGTH:
            raise CallersError(
                f"{where}: key #{position} is shorter than {MIN_API_KEY_LENGTH} characters; use "
                "long random keys (e.g. `openssl rand -hex 24`)"
            )
        else:
            digests.append(key_digest(key))
    return tuple(digests)


def _secrets(where: str, value: object) -> tuple[SecretStr, ...]:
    secrets = _strings(where, "webhook_secrets", value)
    for position, secret in enumerate(secrets, start=1):
        problem = check_secret(secret)
        if problem is not None:
            raise CallersError(f"{where}: webhook secret #{position} {problem}")
    return tuple(SecretStr(secret) for secret in secrets)


def _hosts(where: str, value: object) -> tuple[str, ...]:
    hosts = [host.lower().rstrip(".") for host in _strings(where, "callback_hosts", value)]
    for host in hosts:
        if not HOST_PATTERN.fullmatch(host):
            raise CallersError(f"{where}: callback host {host[:100]!r} is not a host name or glob")
    return tuple(hosts)


def _number(where: str, entry: Mapping[str, object], name: str) -> float | None:
    value = entry.get(name)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 < value < float("inf")  # NaN fails too
    ):
        raise CallersError(f"{where}: {name} must be a finite number above 0")
    return float(value)


def _optional_int(where: str, entry: Mapping[str, object], name: str) -> int | None:
    value = entry.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CallersError(f"{where}: {name} must be a whole number of at least 1")
    return value
