"""Typed settings, read once from the environment and checked at start-up.

Every field is bound to the exact environment variable operators set (the Chamelaion ones use
the names the official SDK reads). A missing or bad value becomes a ConfigError that names the
variable, so a misconfigured pod says what to fix instead of crashing later.

Plain data, below every stage: settings import no stage. The stages build what they need from
them (`callback_policy` in relay.delivery.netpolicy, `Breaker.from_settings`), and the formats
checked here at load time are read the same way there (`parse_networks`, `parse_ports` and
`parse_sentinel_url` below; relay.signing for webhook secrets).
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from relay.errors import ConfigError
from relay.signing import check_secret

# The Standard Webhooks example schedule: immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h,
# 20 h, 24 h. Each number is the wait before that attempt.
DEFAULT_RETRY_SCHEDULE = (
    0.0,
    5.0,
    300.0,
    1800.0,
    7200.0,
    18000.0,
    36000.0,
    50400.0,
    72000.0,
    86400.0,
)

# Callback ports, when the operator sets none (RELAY_CALLBACK_ALLOWED_PORTS): the web ports.
DEFAULT_ALLOWED_PORTS = "80,443,8080,8443"

# The part of a claimed poll's lease its upstream call may take; the rest is room to record the
# answer (a few Redis writes).
POLL_SHARE = 0.8

Role = Literal["api", "worker"]

# Caller keys are bearer secrets: long enough that guessing one is out of the question.
MIN_API_KEY_LENGTH = 16


def parse_networks(text: str) -> tuple[IPv4Network | IPv6Network, ...]:
    """Parse comma-separated CIDRs (a bare address is a /32 or /128); raise naming the bad one."""
    networks: list[IPv4Network | IPv6Network] = []
    for entry in (item.strip() for item in text.split(",")):
        if not entry:
            continue
        try:
            # strict: `10.0.0.1/8` is almost always a typo for 10.0.0.0/8 or 10.0.0.1/32.
            networks.append(ip_network(entry, strict=True))
        except ValueError as exc:
            raise ValueError(f"{entry!r} is not a CIDR network: {exc}") from exc
    return tuple(networks)


def parse_ports(text: str) -> frozenset[int]:
    """Parse comma-separated ports and ranges (`80,443,8000-8999`); raise naming the bad one."""
    ports: set[int] = set()
    for entry in (item.strip() for item in text.split(",")):
        if not entry:
            continue
        low, dash, high = entry.partition("-")
        try:
            first, last = int(low), int(high if dash else low)
        except ValueError:
            raise ValueError(f"{entry!r} is not a port or a port range") from None
        if not 0 < first <= last < 65536:
            raise ValueError(f"{entry!r} is not a port or a range within 1-65535")
        ports.update(range(first, last + 1))
    return frozenset(ports)


SENTINEL_SCHEME = "redis+sentinel"


@dataclass(frozen=True)
class SentinelTarget:
    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int
    password: str | None


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Raise ValueError (without echoing the URL, which may hold a password) when malformed."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        raise ValueError(f"must start with {SENTINEL_SCHEME}://")
    credentials, _, hosts = parts.netloc.rpartition("@")
    sentinels: list[tuple[str, int]] = []
    for entry in hosts.split(","):
        host, _, port = entry.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError("each sentinel must be host:port")
        sentinels.append((host.strip("[]"), int(port)))
    path = [segment for segment in parts.path.split("/") if segment]
    if not 1 <= len(path) <= 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("the path must be /master-name or /master-name/db")
    password = unquote(credentials.partition(":")[2]) if credentials else None
    return SentinelTarget(
        tuple(sentinels), path[0], int(path[1]) if len(path) == 2 else 0, password or None
    )


def check_redis_url(url: str) -> None:
    """Raise ValueError unless `url` is one RELAY_REDIS_URL may be (relay.redis.conn)."""
    if url.startswith(SENTINEL_SCHEME + "://"):
        parse_sentinel_url(url)
    elif not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"must be a redis://, rediss://, unix:// or {SENTINEL_SCHEME}:// URL")


def _split(value: object) -> object:
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        case_sensitive=True, extra="ignore", frozen=True, allow_inf_nan=False
    )

    chamelaion_base_url: str = Field(
        "https://api.chamelaion.com/api", validation_alias="CHAMELAION_BASE_URL"
    )
    chamelaion_api_key: SecretStr | None = Field(None, validation_alias="CHAMELAION_API_KEY")
    redis_url: str = Field("redis://localhost:6379/0", validation_alias="RELAY_REDIS_URL")
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        (), validation_alias="RELAY_API_KEYS"
    )
    webhook_secrets: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        (), validation_alias="RELAY_WEBHOOK_SECRETS"
    )
    # The callers (relay.callers): their keys, roles, own secrets and limits; re-read when it
    # changes. Unset: RELAY_API_KEYS are one caller, `default`, an admin.
    callers_file: str | None = Field(None, min_length=1, validation_alias="RELAY_CALLERS_FILE")
    poll_min_interval: float = Field(2.0, gt=0, validation_alias="RELAY_POLL_MIN_INTERVAL")
    poll_max_interval: float = Field(60.0, gt=0, validation_alias="RELAY_POLL_MAX_INTERVAL")
    # How long a worker holds a claimed poll before another may take it over (crash recovery).
    poll_lease: float = Field(30.0, gt=0, le=50, validation_alias="RELAY_POLL_LEASE")
    # A request the upstream answers 404 for this long is given up as failed.
    not_found_grace: float = Field(600.0, ge=0, validation_alias="RELAY_NOT_FOUND_GRACE")
    delivery_retry_schedule: Annotated[tuple[float, ...], NoDecode] = Field(
        DEFAULT_RETRY_SCHEDULE, validation_alias="RELAY_DELIVERY_RETRY_SCHEDULE"
    )
    delivery_timeout: float = Field(15.0, gt=0, le=60, validation_alias="RELAY_DELIVERY_TIMEOUT")
    # A final event's attempt made this long after its job ended first re-reads the job from
    # Chamelaion, for a fresh output_url (0: never). See relay.delivery.refresh for the default.
    refresh_after: float = Field(600.0, ge=0, validation_alias="RELAY_REFRESH_AFTER")
    upstream_rate_limit: float = Field(10.0, gt=0, validation_alias="RELAY_UPSTREAM_RATE_LIMIT")
    # The part of that rate only status reads (sweep pages, per-id polls) may use: submissions
    # and the API's other calls cannot take it, however many arrive (relay.jobs.schedule).
    status_read_share: float = Field(0.2, ge=0, le=0.9, validation_alias="RELAY_STATUS_READ_SHARE")
    # Sweeps: how often the list of requests is read for statuses (0: never, per-id polls only),
    # how many rows a page is asked for (Chamelaion may answer with fewer), and how far back the
    # list is read: outstanding jobs older than this are polled by id only.
    sweep_interval: float = Field(1.0, ge=0, le=3600, validation_alias="RELAY_SWEEP_INTERVAL")
    sweep_page_size: int = Field(1000, ge=1, le=10_000, validation_alias="RELAY_SWEEP_PAGE_SIZE")
    sweep_window: float = Field(3600.0, gt=0, validation_alias="RELAY_SWEEP_WINDOW")
    # List pages one sweep has in flight at once, once the first page told the list's shape.
    sweep_concurrency: int = Field(8, ge=1, le=100, validation_alias="RELAY_SWEEP_CONCURRENCY")
    upstream_timeout: float = Field(30.0, gt=0, validation_alias="RELAY_UPSTREAM_TIMEOUT")
    worker_concurrency: int = Field(
        100, ge=1, le=10_000, validation_alias="RELAY_WORKER_CONCURRENCY"
    )
    # Callback attempts in flight per worker, in all and per destination (scheme, host, port).
    delivery_concurrency: int = Field(
        1000, ge=1, le=100_000, validation_alias="RELAY_DELIVERY_CONCURRENCY"
    )
    destination_concurrency: int = Field(
        20, ge=1, le=10_000, validation_alias="RELAY_DESTINATION_CONCURRENCY"
    )
    # A destination that failed to answer this many times in a row is backed off as a whole,
    # for 5 s doubling with each further failure, up to the maximum.
    destination_failures: int = Field(5, ge=1, validation_alias="RELAY_DESTINATION_FAILURES")
    destination_max_backoff: float = Field(
        300.0, gt=0, le=86400, validation_alias="RELAY_DESTINATION_MAX_BACKOFF"
    )
    # A job still unfinished upstream after this long is given up as failed.
    max_job_age: float = Field(7 * 86400.0, gt=0, validation_alias="RELAY_MAX_JOB_AGE")
    job_retention: float = Field(7 * 86400.0, gt=0, validation_alias="RELAY_JOB_RETENTION")
    callback_allowed_networks: str = Field("", validation_alias="RELAY_CALLBACK_ALLOWED_NETWORKS")
    callback_denied_networks: str = Field("", validation_alias="RELAY_CALLBACK_DENIED_NETWORKS")
    callback_allowed_ports: str = Field(
        DEFAULT_ALLOWED_PORTS, validation_alias="RELAY_CALLBACK_ALLOWED_PORTS"
    )
    # The port `relay api` listens on (unless --port says otherwise); never a callback port.
    api_port: int = Field(8000, ge=1, le=65535, validation_alias="RELAY_API_PORT")
    # /metrics answers only with a caller key when set (off: Prometheus scrapes in-cluster).
    metrics_auth: bool = Field(False, validation_alias="RELAY_METRICS_AUTH")
    # Concurrent uploads per API process, in total and per caller key; 429 beyond.
    max_uploads: int = Field(32, ge=1, le=10_000, validation_alias="RELAY_MAX_UPLOADS")
    max_uploads_per_key: int = Field(
        4, ge=1, le=10_000, validation_alias="RELAY_MAX_UPLOADS_PER_KEY"
    )
    # The slowest average a caller may send an upload at, bytes/s (after a first stall window).
    upload_min_rate: int = Field(16 * 1024, ge=1, validation_alias="RELAY_UPLOAD_MIN_RATE")
    # The API's HTTP limits (relay.api.protocol): time to send a request's headers, idle time
    # between requests, JSON body time, requests in flight per process (503 beyond), and open
    # connections per process, in all and per peer address (past either cap the longest idle
    # connection is closed to make room; a new one is closed when all are busy).
    http_header_timeout: float = Field(
        10.0, gt=0, le=300, validation_alias="RELAY_HTTP_HEADER_TIMEOUT"
    )
    http_keepalive_timeout: int = Field(
        5, ge=1, le=300, validation_alias="RELAY_HTTP_KEEPALIVE_TIMEOUT"
    )
    http_body_timeout: float = Field(30.0, gt=0, le=600, validation_alias="RELAY_HTTP_BODY_TIMEOUT")
    http_max_concurrency: int = Field(
        1000, ge=1, le=100_000, validation_alias="RELAY_HTTP_MAX_CONCURRENCY"
    )
    http_max_connections: int = Field(
        2048, ge=1, le=100_000, validation_alias="RELAY_HTTP_MAX_CONNECTIONS"
    )
    http_max_connections_per_peer: int = Field(
        512, ge=1, le=100_000, validation_alias="RELAY_HTTP_MAX_CONNECTIONS_PER_PEER"
    )
    max_body_bytes: int = Field(1024 * 1024, ge=1024, validation_alias="RELAY_MAX_BODY_BYTES")
    max_upload_bytes: int = Field(5 * 1024**3, ge=1024, validation_alias="RELAY_MAX_UPLOAD_BYTES")
    log_format: Literal["json", "text"] = Field("json", validation_alias="RELAY_LOG_FORMAT")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", validation_alias="RELAY_LOG_LEVEL"
    )
    shutdown_timeout: float = Field(20.0, ge=0, validation_alias="RELAY_SHUTDOWN_TIMEOUT")
    # Signs console sessions; derived from RELAY_API_KEYS when unset (see relay.console.session).
    console_secret: SecretStr | None = Field(None, validation_alias="RELAY_CONSOLE_SECRET")
    # The console's cookies are always Secure (behind a TLS proxy not in
    # RELAY_FORWARDED_ALLOW_IPS); otherwise Secure when the request came over https.
    console_secure_cookies: bool = Field(False, validation_alias="RELAY_CONSOLE_SECURE_COOKIES")
    # The proxies whose X-Forwarded-Proto and X-Forwarded-For the API believes (uvicorn's
    # forwarded_allow_ips): comma-separated addresses and networks, or `*` for any.
    forwarded_allow_ips: str = Field("127.0.0.1,::1", validation_alias="RELAY_FORWARDED_ALLOW_IPS")
    # How often one worker looks for pending deliveries whose queued attempt is gone, and how
    # long a delivery must have waited before it counts as stranded.
    stranded_sweep_interval: float = Field(
        60.0, gt=0, le=3600, validation_alias="RELAY_STRANDED_SWEEP_INTERVAL"
    )
    stranded_after: float = Field(120.0, ge=0, validation_alias="RELAY_STRANDED_AFTER")
    # How long an Idempotency-Key and its first answer are kept.
    idempotency_ttl: float = Field(86400.0, ge=60, validation_alias="RELAY_IDEMPOTENCY_TTL")
    # Keep the start of receivers' answers in the attempt log (any caller key can read it).
    attempt_log_excerpt: bool = Field(False, validation_alias="RELAY_ATTEMPT_LOG_EXCERPT")
    # Test events one caller key may send per minute (429 beyond).
    test_events_per_minute: int = Field(
        10, ge=1, le=10_000, validation_alias="RELAY_TEST_EVENTS_PER_MINUTE"
    )
    # Redeliver and recover requests one caller may make per minute (429 beyond).
    redeliveries_per_minute: int = Field(
        60, ge=1, le=100_000, validation_alias="RELAY_REDELIVERIES_PER_MINUTE"
    )
    recovers_per_minute: int = Field(
        6, ge=1, le=10_000, validation_alias="RELAY_RECOVERS_PER_MINUTE"
    )
    # Idempotency-Key records one caller key may hold at once (429 beyond): each is at most
    # ~1.5 KB in Redis, so the default bounds a caller's share to ~15 MB.
    idempotency_max_keys: int = Field(
        10_000, ge=1, le=10_000_000, validation_alias="RELAY_IDEMPOTENCY_MAX_KEYS"
    )
    worker_http_port: int = Field(9100, ge=0, le=65535, validation_alias="RELAY_WORKER_HTTP_PORT")
    # Every Redis call (connect, then each reply) fails after this long instead of hanging.
    redis_timeout: float = Field(2.0, gt=0, le=30, validation_alias="RELAY_REDIS_TIMEOUT")
    # Replicas that must hold a new job before its caller hears success (Redis WAIT); 0: none.
    redis_wait_replicas: int = Field(0, ge=0, le=10, validation_alias="RELAY_REDIS_WAIT_REPLICAS")
    redis_wait_timeout: float = Field(1.0, gt=0, le=30, validation_alias="RELAY_REDIS_WAIT_TIMEOUT")
    # The longest pause of all polling one upstream 429 (its Retry-After) can cause.
    max_upstream_pause: float = Field(300.0, gt=0, validation_alias="RELAY_MAX_UPSTREAM_PAUSE")

    # Submissions whose upstream answer was lost (relay.jobs.intents): how often one worker looks
    # for their jobs, and for how long after the submission before giving up on one.
    intent_reconcile_interval: float = Field(
        10.0, gt=0, le=3600, validation_alias="RELAY_INTENT_RECONCILE_INTERVAL"
    )
    intent_window: float = Field(900.0, gt=0, validation_alias="RELAY_INTENT_WINDOW")
    # How soon after a create's intent is written the reconcile may first look for its job
    # (None: once the API can no longer be working on it, relay.jobs.intents.stale_after).
    intent_first_look: float | None = Field(
        None, gt=0, le=3600, validation_alias="RELAY_INTENT_FIRST_LOOK"
    )
    # How long an API call may wait for a slot of the shared upstream budget before the caller
    # is answered 429 instead.
    api_budget_wait: float = Field(2.0, ge=0, le=60, validation_alias="RELAY_API_BUDGET_WAIT")
    # Each caller's limits on submissions where its callers-file entry sets none (0: no limit):
    # its jobs not yet ended, and submissions per second (relay.api.budget).
    caller_max_outstanding: int = Field(0, ge=0, validation_alias="RELAY_CALLER_MAX_OUTSTANDING")
    caller_submit_rate: float = Field(0.0, ge=0, validation_alias="RELAY_CALLER_SUBMIT_RATE")
    # The longest a request may be held open for a job's events (`Prefer: wait`, a feed read's
    # `wait`), and the time between keepalive comments on an event stream.
    max_wait: int = Field(60, ge=0, le=3600, validation_alias="RELAY_MAX_WAIT")
    events_keepalive: float = Field(15.0, gt=0, le=300, validation_alias="RELAY_EVENTS_KEEPALIVE")
    # Where operational events go (relay.delivery.ops_events), signed with their own secret.
    ops_webhook_url: str | None = Field(None, validation_alias="RELAY_OPS_WEBHOOK_URL")
    ops_webhook_secret: SecretStr | None = Field(None, validation_alias="RELAY_OPS_WEBHOOK_SECRET")

    @field_validator("api_keys", "webhook_secrets", "delivery_retry_schedule", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split(value)

    @field_validator("callback_allowed_networks", "callback_denied_networks")
    @classmethod
    def _networks(cls, value: str) -> str:
        parse_networks(value)  # raises ValueError naming the bad entry
        return value

    def claim_lease(self) -> float:
        """How long a claimed poll stays with its worker: RELAY_POLL_LEASE, or longer when a
        poll's upstream call (up to RELAY_UPSTREAM_TIMEOUT) would not fit in POLL_SHARE of it.

        A poll cut off before its answer records nothing; with a lease too short for the
        upstream timeout, every answer slower than the lease allows would be lost the same way,
        until the job aged out as failed (issue #11). Raising the lease keeps a slow answer; it
        only lengthens how soon a crashed worker's polls are taken over.
        """
        return max(self.poll_lease, self.upstream_timeout / POLL_SHARE)

    @field_validator("callback_allowed_ports")
    @classmethod
    def _ports(cls, value: str) -> str:
        if not parse_ports(value):  # raises ValueError naming the bad entry
            raise ValueError("needs at least one port")
        return value

    @field_validator("api_keys")
    @classmethod
    def _long_keys(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for position, key in enumerate(value, start=1):
            if len(key.get_secret_value()) < MIN_API_KEY_LENGTH:
                raise ValueError(
                    f"key #{position} is shorter than {MIN_API_KEY_LENGTH} characters; "
                    "use long random keys (e.g. `openssl rand -hex 24`)"
                )
        return value

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _trusted_proxies(cls, value: str) -> str:
        # uvicorn takes anything it cannot parse as a name it will never see: say so instead.
        entries = [entry.strip() for entry in value.split(",") if entry.strip()]
        if entries == ["*"]:
            return value
        for entry in entries:
            try:
                if "/" in entry:
                    ip_network(entry)
                else:
                    ip_address(entry)
            except ValueError:
                raise ValueError(
                    f"{entry!r} is not an address or a network (address/prefix, host bits "
                    "zero), nor a lone `*`"
                ) from None
        return value

    @field_validator("chamelaion_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL")
        # The URL goes into every create's span (url.full) and into errors that name it: a
        # credential in it would go along. The key has CHAMELAION_API_KEY.
        parts = urlsplit(value)
        if "@" in parts.netloc or "?" in value or "#" in value:
            raise ValueError(
                "must not carry a user, a password, a query or a fragment (the key goes in "
                "CHAMELAION_API_KEY)"
            )
        return value.rstrip("/")

    @field_validator("ops_webhook_url")
    @classmethod
    def _ops_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL")
        return value or None

    @field_validator("ops_webhook_secret")
    @classmethod
    def _ops_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            problem = check_secret(value.get_secret_value())
            if problem is not None:
                raise ValueError(problem)
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        check_redis_url(value)
        return value

    @field_validator("webhook_secrets")
    @classmethod
    def _webhook_secrets(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for position, secret in enumerate(value, start=1):
            problem = check_secret(secret.get_secret_value())
            if problem is not None:
                raise ValueError(f"secret #{position} {problem}")
        return value

    @field_validator("delivery_retry_schedule")
    @classmethod
    def _schedule(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value:
            raise ValueError("needs at least one attempt")
        if any(delay < 0 for delay in value):
            raise ValueError("delays must not be negative")
        return value

    @field_validator("job_retention")
    @classmethod
    def _outlives_deliveries(cls, value: float, info: ValidationInfo) -> float:
        # An ended job's hash holds its callback: it must outlive the last delivery attempt.
        schedule = info.data.get("delivery_retry_schedule")
        if schedule is not None and value < sum(schedule) * 1.1 + 3600:
            raise ValueError(
                "must exceed the whole RELAY_DELIVERY_RETRY_SCHEDULE (plus jitter) by an hour"
            )
        return value

    @field_validator("redis_wait_timeout")
    @classmethod
    def _wait_inside_timeout(cls, value: float, info: ValidationInfo) -> float:
        # WAIT blocks on the server; the client's own read timeout must outlast it.
        timeout = info.data.get("redis_timeout")
        if info.data.get("redis_wait_replicas") and timeout is not None and value >= timeout:
            raise ValueError("must be shorter than RELAY_REDIS_TIMEOUT")
        return value

    @field_validator("poll_max_interval")
    @classmethod
    def _interval_bounds(cls, value: float, info: ValidationInfo) -> float:
        minimum = info.data.get("poll_min_interval")
        if minimum is not None and value < minimum:
            raise ValueError("must be >= RELAY_POLL_MIN_INTERVAL")
        return value

    def require(self, role: Role) -> Settings:
        """Check what a role cannot start without; returns self so calls chain."""
        needed: dict[str, bool] = {"CHAMELAION_API_KEY": self.chamelaion_api_key is not None}
        if self.callers_file is not None and self.api_keys:
            raise ConfigError(
                "RELAY_API_KEYS",
                "must not be set beside RELAY_CALLERS_FILE: give those keys a caller in the file",
            )
        if (role == "api" or self.metrics_auth) and self.callers_file is None:
            needed["RELAY_API_KEYS"] = bool(self.api_keys)
        if role == "worker":
            needed["RELAY_WEBHOOK_SECRETS"] = bool(self.webhook_secrets)
            if self.ops_webhook_url:
                # Its receiver must be able to tell the relay's events from forgeries.
                needed["RELAY_OPS_WEBHOOK_SECRET"] = self.ops_webhook_secret is not None
        for variable, present in needed.items():
            if not present:
                raise ConfigError(variable, "is required and not set")
        return self


def load_settings(**overrides: Any) -> Settings:
    """Read the environment (plus explicit overrides by variable name) into Settings."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        error = exc.errors()[0]
        variable = str(error["loc"][0])
        # The message never includes the input value: it may be a secret.
        raise ConfigError(variable, f"is invalid: {error['msg']}") from None
