"""Configuration: environment variables read once, typed and validated at start.

Every problem is reported on its own line (``ConfigError.problems``); the CLI prints them
and exits with status 2. Secrets are wrapped in :class:`Secret`, whose ``repr`` and ``str``
never show the value.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from gateway.domain.errors import ConfigError

PREFIX = "SWITCHBOARD_"
DEFAULT_DATA_DIR = "./var"
DEFAULT_GRPC_ADDR = "127.0.0.1:50051"
DATABASE_FILE_NAME = "switchboard.db"
DEV_TOKEN_FILE_NAME = "dev-token"  # noqa: S105 - a file name, not a secret
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")


class Secret:
    """A value that must never be printed; ``reveal()`` is the only way in."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    def __str__(self) -> str:
        return "***" if self._value else ""

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _reachable(addr: Address) -> Address:
    """The address a client on this machine dials for a server bound to ``addr``: a
    wildcard host is no destination."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(addr.host, addr.host)
    return Address(host, addr.port)


def _local_url(addr: Address) -> str:
    """The sidecar's URL on this machine, the public URL's default: moving the sidecar to
    another port must not leave OAuth redirects and webhooks pointing at the old one."""
    port = addr.port or 8080  # port 0 (tests): known only once bound, so set PUBLIC_URL
    return f"http://{Address(_reachable(addr).host, port)}"


def grpc_target_from(environ: Mapping[str, str]) -> str:
    """Where a client on this machine finds the gRPC server ``SWITCHBOARD_GRPC_ADDR``
    describes, for the examples: moving the server to another port must not leave them
    dialling the default one. An address the gateway would refuse is returned as given,
    for the client to report."""
    value = environ.get(PREFIX + "GRPC_ADDR", "").strip() or DEFAULT_GRPC_ADDR
    try:
        return str(_reachable(parse_address(value)))
    except ValueError:
        return value


def data_dir_from(environ: Mapping[str, str]) -> str:
    """``SWITCHBOARD_DATA_DIR`` as :class:`Config` reads it, for tools that need only that
    (the examples find the dev token with it) and should not fail on unrelated variables."""
    return environ.get(PREFIX + "DATA_DIR", "").strip() or DEFAULT_DATA_DIR


def default_database_url(data_dir: str) -> str:
    """The embedded default's database, inside the data dir: moving the data dir must move
    the database with the keys and the dev token, or they would stop matching."""
    # sqlite:/// + "/abs/dir/..." gives sqlite:////abs/dir/..., the absolute form.
    return "sqlite:///" + os.path.join(data_dir, DATABASE_FILE_NAME)


def parse_address(value: str) -> Address:
    """``host:port`` or ``[v6]:port``; port 0 lets the OS pick (tests)."""
    value = value.strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError("expected [host]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            raise ValueError("expected host:port")
    if not host:
        raise ValueError("the host is empty")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"the port {port_text!r} is not a number from 0 to 65535")
    return Address(host, int(port_text))


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


@dataclass(frozen=True)
class Config:
    database_url: Secret
    redis_url: Secret
    redis_key_prefix: str
    grpc_addr: Address
    http_addr: Address
    metrics_addr: Address
    public_url: str
    encryption_keys: Secret
    api_tokens: Secret
    allowed_return_origins: tuple[str, ...]
    log_level: str
    log_format: str
    data_dir: str
    shutdown_grace_s: float
    http_max_body_bytes: int
    # A webhook not stored within this is answered 503 (Meta retries); Meta itself gives
    # up on an answer after about 20 s.
    webhook_ack_timeout_s: float = 4.0
    # A delivery of echoes only (copies of what the business sent) may wait this long to
    # share a commit: nobody waits on it closely, and each commit costs more than an echo.
    # Long enough, too, for the outcome of our own send to be committed first in most
    # cases: Meta echoes a message as it answers the call that sent it, and an echo that
    # finds the message recorded SENT only confirms it, where one stored first is written as
    # a message of its own and then folded into ours.
    webhook_echo_wait_s: float = 0.25
    # Tokens are refreshed once they expire within this margin.
    token_refresh_margin_s: float = 30 * 86400.0
    # Outbound: per-account send rates (per second), the first attempt's wait in
    # SendMessage, and the retry schedule of transient failures.
    send_rate_text: float = 100.0
    send_rate_media: float = 10.0
    send_wait_s: float = 2.0
    send_max_attempts: int = 6
    send_retry_base_s: float = 1.0
    send_retry_max_s: float = 300.0
    send_poll_s: float = 1.0
    # After an attempt that heard no answer (it may have been delivered), how long its
    # retry waits at least for the channel's echo, which it adopts instead of sending again.
    send_unanswered_wait_s: float = 10.0
    # How long a message is leased to the process attempting it; half of it bounds the
    # attempt's rate-limit waits and channel call together.
    send_lease_s: float = 60.0
    # PostgreSQL connections each process may hold at once (its pool's bound).
    database_pool_size: int = 10
    # The raw environment, for channel plugins (they validate their own variables).
    environ: Mapping[str, str] = field(repr=False, compare=False, default_factory=dict)
    # SWITCHBOARD_* variables that were set but are not read (a typo, an old name).
    ignored: tuple[str, ...] = field(compare=False, default=())

    @property
    def embedded(self) -> bool:
        """True when running on SQLite and the in-process bus."""
        return self.database_url.reveal().startswith("sqlite:") and not self.redis_url

    @property
    def database_backend(self) -> str:
        return "sqlite" if self.database_url.reveal().startswith("sqlite:") else "postgres"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Config:
        env = dict(os.environ if environ is None else environ)
        problems: list[str] = []
        reader = _Reader(env, problems)

        data_dir = reader.text("DATA_DIR", DEFAULT_DATA_DIR)
        database_url = reader.text("DATABASE_URL", default_database_url(data_dir))
        if not database_url.startswith(("postgresql://", "postgres://", "sqlite:")):
            problems.append(
                f"{PREFIX}DATABASE_URL: must start with postgresql:// or sqlite:/// "
                f"(got scheme {database_url.partition(':')[0] or 'none'!r})"
            )
        elif not database_url.startswith("sqlite:"):
            libpq_problem = _libpq_problem(database_url)
            if libpq_problem:
                problems.append(f"{PREFIX}DATABASE_URL: {libpq_problem}")
        redis_url = reader.text("REDIS_URL", "")
        if redis_url:
            # Imported here: redis-py is slow to import, and unneeded without Redis.
            from gateway.redis_client import redis_url_problem

            redis_problem = redis_url_problem(redis_url)
            if redis_problem:
                problems.append(f"{PREFIX}REDIS_URL: {redis_problem}")

        http_addr = reader.address("HTTP_ADDR", "127.0.0.1:8080")
        public_url = reader.text("PUBLIC_URL", _local_url(http_addr)).rstrip("/")
        pub = urlsplit(public_url)
        if pub.scheme not in ("http", "https") or not pub.netloc:
            problems.append(f"{PREFIX}PUBLIC_URL: must be an absolute http(s) URL")

        origins_text = reader.text("ALLOWED_RETURN_ORIGINS", "")
        origins: list[str] = []
        for item in filter(None, (o.strip() for o in origins_text.split(","))):
            parts = urlsplit(item)
            if (
                parts.scheme not in ("http", "https")
                or not parts.netloc
                or parts.path
                not in (
                    "",
                    "/",
                )
            ):
                problems.append(
                    f"{PREFIX}ALLOWED_RETURN_ORIGINS: {item!r} is not an origin "
                    "(scheme://host[:port], no path)"
                )
            else:
                origins.append(origin_of(item))
        if not origins and pub.netloc:
            origins.append(origin_of(public_url))

        log_level = reader.choice("LOG_LEVEL", "info", LOG_LEVELS)
        default_format = "text" if sys.stderr.isatty() else "json"
        log_format = reader.choice("LOG_FORMAT", default_format, LOG_FORMATS)

        config = cls(
            database_url=Secret(database_url),
            redis_url=Secret(redis_url),
            redis_key_prefix=reader.text("REDIS_KEY_PREFIX", "switchboard:"),
            grpc_addr=reader.address("GRPC_ADDR", DEFAULT_GRPC_ADDR),
            http_addr=http_addr,
            metrics_addr=reader.address("METRICS_ADDR", "127.0.0.1:9464"),
            public_url=public_url,
            encryption_keys=Secret(reader.text("ENCRYPTION_KEYS", "")),
            api_tokens=Secret(reader.text("API_TOKENS", "")),
            allowed_return_origins=tuple(origins),
            log_level=log_level,
            log_format=log_format,
            data_dir=data_dir,
            shutdown_grace_s=reader.number("SHUTDOWN_GRACE_SECONDS", 10.0, low=0, high=600),
            http_max_body_bytes=int(
                reader.number("HTTP_MAX_BODY_BYTES", 4 * 1024 * 1024, low=1024, high=1 << 30)
            ),
            webhook_ack_timeout_s=reader.number(
                "WEBHOOK_ACK_TIMEOUT_SECONDS", 4.0, low=0.05, high=20
            ),
            webhook_echo_wait_s=reader.number("WEBHOOK_ECHO_WAIT_MS", 250.0, low=0, high=2000)
            / 1000.0,
            token_refresh_margin_s=reader.number("TOKEN_REFRESH_MARGIN_DAYS", 30.0, low=1, high=365)
            * 86400.0,
            send_rate_text=reader.number("SEND_RATE_TEXT_PER_SECOND", 100.0, low=0.01, high=1e5),
            send_rate_media=reader.number("SEND_RATE_MEDIA_PER_SECOND", 10.0, low=0.01, high=1e5),
            send_wait_s=reader.number("SEND_WAIT_SECONDS", 2.0, low=0, high=60),
            send_max_attempts=int(reader.number("SEND_MAX_ATTEMPTS", 6, low=1, high=100)),
            send_retry_base_s=reader.number("SEND_RETRY_BASE_SECONDS", 1.0, low=0.001, high=3600),
            send_retry_max_s=reader.number("SEND_RETRY_MAX_SECONDS", 300.0, low=0.001, high=86400),
            send_poll_s=reader.number("SEND_POLL_SECONDS", 1.0, low=0.01, high=60),
            send_unanswered_wait_s=reader.number(
                "SEND_UNANSWERED_WAIT_SECONDS", 10.0, low=0, high=3600
            ),
            send_lease_s=reader.number("SEND_LEASE_SECONDS", 60.0, low=3, high=3600),
            # At least what one process's concurrent transactions need (two webhook
            # commits, the send commits, the relay, the workers, the API's reads).
            database_pool_size=int(reader.number("DATABASE_POOL_SIZE", 10, low=4, high=500)),
            environ=env,
        )
        # The test suite's own variables share the prefix; they are not the gateway's.
        ignored = sorted(
            k
            for k in env
            if k.startswith(PREFIX)
            and not k.startswith(PREFIX + "TEST_")
            and k[len(PREFIX) :] not in reader.read
        )
        config = replace(config, ignored=tuple(ignored))
        # Deeper checks of structured secrets live with their owners.
        from gateway.security.keyring import validate_key_ring_spec
        from gateway.security.tokens import validate_static_tokens_spec

        problems.extend(validate_key_ring_spec(config.encryption_keys.reveal()))
        problems.extend(validate_static_tokens_spec(config.api_tokens.reveal()))
        if problems:
            raise ConfigError(problems)
        return config

    def describe(self) -> list[tuple[str, str]]:
        """The effective configuration as (name, printable value), secrets masked."""
        out: list[tuple[str, str]] = []
        for f in fields(self):
            if f.name in ("environ", "ignored"):
                continue
            name, per_unit = _VARIABLES.get(f.name, (f.name.upper(), 0.0))
            value: Any = getattr(self, f.name)
            if isinstance(value, Secret):
                shown = _mask_url(value.reveal()) if f.name.endswith("_url") else str(value)
            elif isinstance(value, tuple):
                shown = ",".join(value)
            elif per_unit:
                shown = f"{value / per_unit:g}"
            else:
                shown = str(value)
            out.append((PREFIX + name, shown or "(unset)"))
        return out


# Fields whose variable is not their upper-cased name: the variable, and what one of its
# units is in the field's (0: the same).
_VARIABLES: dict[str, tuple[str, float]] = {
    "shutdown_grace_s": ("SHUTDOWN_GRACE_SECONDS", 0.0),
    "webhook_ack_timeout_s": ("WEBHOOK_ACK_TIMEOUT_SECONDS", 0.0),
    "webhook_echo_wait_s": ("WEBHOOK_ECHO_WAIT_MS", 0.001),
    "token_refresh_margin_s": ("TOKEN_REFRESH_MARGIN_DAYS", 86400.0),
    "send_rate_text": ("SEND_RATE_TEXT_PER_SECOND", 0.0),
    "send_rate_media": ("SEND_RATE_MEDIA_PER_SECOND", 0.0),
    "send_wait_s": ("SEND_WAIT_SECONDS", 0.0),
    "send_retry_base_s": ("SEND_RETRY_BASE_SECONDS", 0.0),
    "send_retry_max_s": ("SEND_RETRY_MAX_SECONDS", 0.0),
    "send_poll_s": ("SEND_POLL_SECONDS", 0.0),
    "send_unanswered_wait_s": ("SEND_UNANSWERED_WAIT_SECONDS", 0.0),
    "send_lease_s": ("SEND_LEASE_SECONDS", 0.0),
}


_ENCODE = (
    "percent-encode the special characters of the user name and password"
    " (a space, %, @, :, /, [ or ])"
)


def _libpq_problem(url: str) -> str | None:
    """Why libpq would not connect where the URL seems to say, in words that quote none of
    it (libpq's own error quotes the part it could not read, which may be the password);
    None when it reads as meant."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        parts = conninfo_to_dict(url)
    except psycopg.Error:
        return f"libpq cannot read it; {_ENCODE}"
    # libpq ends the user part at the first '@' and the host at the first '/': a password's
    # '@' or '/' left as typed becomes part of the host, port or database name (and would
    # then be logged as a host that does not resolve).
    if any("@" in str(parts.get(key, "")) for key in ("host", "hostaddr", "port", "dbname")):
        return f"part of the user name or password is read as the host or database; {_ENCODE}"
    ports = str(parts.get("port", ""))
    if ports and not all(p.isdigit() for p in ports.split(",") if p):
        return "the port is not a number"
    return None


def _mask_url(url: str) -> str:
    """Keeps a URL readable while hiding its password, in the user part or in the query
    (libpq and redis-py both read ``?password=``). Masked in place, as text: rebuilt by
    urllib, a URL without a host (``postgresql:///db?host=/run/...``) would lose its ``//``.
    The user part ends at the last ``@``: libpq takes a password holding ``#``, ``?`` or
    ``/`` as typed, where urllib would end the authority early and show the rest."""
    if not url:
        return ""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        userinfo, _, rest = rest.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        rest = f"{user}{':***' if colon else ''}@{rest}"
    base, question, after = (scheme + sep + rest).partition("?")
    query, hash_, fragment = after.partition("#")
    pairs = parse_qsl(query, keep_blank_values=True)
    if any("password" in k.lower() for k, _ in pairs):
        masked = [(k, "***" if "password" in k.lower() else v) for k, v in pairs]
        query = urlencode(masked, safe="*/")
    return base + question + query + hash_ + fragment


def log_level_from(environ: Mapping[str, str]) -> str:
    """``SWITCHBOARD_LOG_LEVEL`` as :class:`Config` reads it, for commands that need only
    that (``switchboard sandbox``); ConfigError on a value it would refuse."""
    problems: list[str] = []
    level = _Reader(environ, problems).choice("LOG_LEVEL", "info", LOG_LEVELS)
    if problems:
        raise ConfigError(problems)
    return level


def read_number(
    variable: str, raw: str, default: float, *, low: float, high: float, problems: list[str]
) -> float:
    """``raw``, the value of ``variable``, as a number from ``low`` to ``high``; ``default``
    when unset, and when it is no number or out of range (a line in ``problems`` then).
    Channel plugins read their own variables with it too."""
    raw = raw.strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        problems.append(f"{variable}: {raw!r} is not a number")
        return default
    if not low <= value <= high:
        problems.append(f"{variable}: {raw} is outside {low:g}..{high:g}")
        return default
    return value


class _Reader:
    def __init__(self, env: Mapping[str, str], problems: list[str]) -> None:
        self.env = env
        self.problems = problems
        self.read: set[str] = set()

    def text(self, name: str, default: str) -> str:
        self.read.add(name)
        return self.env.get(PREFIX + name, "").strip() or default

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.text(name, default).lower()
        if value not in allowed:
            self.problems.append(f"{PREFIX}{name}: {value!r} is not one of {', '.join(allowed)}")
            return default
        return value

    def address(self, name: str, default: str) -> Address:
        value = self.text(name, default)
        try:
            return parse_address(value)
        except ValueError as exc:
            self.problems.append(f"{PREFIX}{name}: {value!r}: {exc}")
            return parse_address(default)

    def number(self, name: str, default: float, *, low: float, high: float) -> float:
        raw = self.text(name, "")
        return read_number(PREFIX + name, raw, default, low=low, high=high, problems=self.problems)
