"""The ``switchboard`` command.

Exit status: 0 on success, 1 on a runtime failure, 2 on a configuration or usage problem
(one line per problem on standard error).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway import __version__
from gateway.config import DEV_TOKEN_FILE_NAME, PREFIX, Config, log_level_from
from gateway.domain.errors import ConfigError, InvalidArgument, StoreUnavailable, SwitchboardError
from gateway.observability.logging import configure_logging
from gateway.runtime import tune_gc_for_serving

if TYPE_CHECKING:
    from gateway.domain.store import Store

log = logging.getLogger("gateway.cli")

CONFIG_EPILOG = (
    "Settings come from SWITCHBOARD_* environment variables: `switchboard config check` "
    "prints the effective ones; the README's Configuration section lists them all."
)


def _load_config() -> Config:
    try:
        config = Config.from_environ()
    except ConfigError as exc:
        # Every problem at once: the channels' variables too, not only after a second run.
        raise ConfigError([*exc.problems, *_channel_problems()]) from None
    configure_logging(config.log_level, config.log_format)
    return config


def _channel_problems() -> list[str]:
    from gateway.domain.channel import ChannelContext
    from gateway.plugins import load_channels

    env = dict(os.environ)
    public_url = env.get("SWITCHBOARD_PUBLIC_URL", "").strip() or "http://127.0.0.1:8080"
    try:
        load_channels(ChannelContext(environ=env, public_url=public_url))
    except ConfigError as exc:
        return list(exc.problems)
    return []


def _run(coro_fn: Callable[[], Coroutine[Any, Any, int]], *, fast_loop: bool = False) -> int:
    if fast_loop:
        try:
            import uvloop

            return uvloop.run(coro_fn())
        except ImportError:  # uvloop is optional off Linux/macOS
            pass
    return asyncio.run(coro_fn())


# ---- serve ----


async def _ensure_dev_token(gateway: Any, data_dir: str) -> str:
    """The dev token of ``make run``: created on first run, reused after (0600 file)."""
    from gateway.domain.errors import Unauthenticated
    from gateway.security.tokens import create_token

    path = Path(data_dir) / DEV_TOKEN_FILE_NAME
    if path.exists():
        token = path.read_text().strip()
        try:
            await gateway.authority.authenticate(token)
            return token
        except Unauthenticated:
            log.warning("the saved dev token is unknown to this database; creating a new one")
    token, _ = await create_token(gateway.store, name="dev", tenants=["*"], scopes=[])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.app import CannotListen, Gateway, Listening, Role, install_signal_handlers

    config = _load_config()
    role = Role(args.role)
    for name in config.ignored:
        log.warning("unknown variable ignored", extra={"variable": name})

    async def main() -> int:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        async with Gateway(config) as gateway:
            await gateway.ensure_schema()
            if role is not Role.ALL:
                for name, plugin in gateway.channels.items():
                    if getattr(plugin, "embedded_sandbox", False):
                        # The other role's process starts a sandbox of its own, with other
                        # credentials: its OAuth states and webhooks would not match ours.
                        log.warning(
                            "this process runs its own built-in sandbox, which the other"
                            " role's process cannot share: run `switchboard sandbox` and"
                            " give both processes its URL (INSTAGRAM_SANDBOX_URL)",
                            extra={"channel": name, "role": role.value},
                        )
            dev_token = await _ensure_dev_token(gateway, config.data_dir) if args.dev else ""

            def announce(where: Listening) -> None:
                log.info(
                    "switchboard is up",
                    extra={
                        "role": role.value,
                        "grpc": str(where.grpc or "-"),
                        "http": str(where.http or "-"),
                        "metrics": str(where.metrics or "-"),
                        "database": config.database_backend,
                        "bus": "redis" if config.redis_url else "in-process",
                    },
                )
                if args.dev:
                    sandboxes = {
                        name: getattr(gateway.channels[name], "sandbox_url", "")
                        for name in gateway.channels
                    }
                    _print_banner(where, dev_token, {k: v for k, v in sandboxes.items() if v})

            await gateway.serve(role, stop=stop, on_listening=announce)
        return 0

    tune_gc_for_serving()
    try:
        return _run(main, fast_loop=True)
    except CannotListen as exc:
        print(f"switchboard: {exc}", file=sys.stderr)
        return 1


def _print_banner(where: Any, token: str, sandboxes: dict[str, str]) -> None:
    sandbox_lines = [
        f"  sandbox  {url}  ({name}: Meta's stand-in)" for name, url in sandboxes.items()
    ]
    lines = [
        "",
        "Switchboard is running (Ctrl-C stops it).",
        f"  gRPC     {where.grpc}",
        f"  HTTP     http://{where.http}",
        f"  metrics  http://{where.metrics}/metrics",
        f"  token    {token}",
        *sandbox_lines,
        "",
        # The first needs nothing but this environment; grpcurl is for those who have it.
        f"Try:  {sys.executable} -m clients.examples.quickstart --target {where.grpc}",
        "      (the whole mission, step by step, from the repository root)",
        "  or  grpcurl -plaintext -H 'authorization: Bearer <token>' "
        f"{where.grpc} switchboard.v1.ChannelConnect/ListChannels",
        "",
    ]
    # The dev banner is the point of `make run`: it goes to the terminal, not the log.
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


# ---- migrate ----


def cmd_migrate(_: argparse.Namespace) -> int:
    from gateway.store import open_store

    config = _load_config()

    async def main() -> int:
        async with open_store(config.database_url.reveal()) as store:
            applied = await store.migrate()
        if applied:
            print(f"applied {len(applied)} migration(s): {', '.join(applied)}")
        else:
            print("the database is up to date")
        return 0

    return _run(main)


# ---- the store of the commands that manage it ----


@asynccontextmanager
async def _open_migrated_store(config: Config) -> AsyncIterator[Store]:
    """The store with the schema `serve` would give it: SQLite is migrated as `serve`
    migrates it, PostgreSQL must have been (a deploy step, as for `serve`).

    A SQLite file that does not exist is refused, not created: run from the wrong directory
    or with another data dir, a command would otherwise fill a database the gateway never
    reads (a token that does not work) and leave it behind.
    """
    from gateway.store import open_store, sqlite_path
    from gateway.store.migrate import ensure_schema

    url = config.database_url.reveal()
    if config.database_backend == "sqlite":
        _require_sqlite_file(config, sqlite_path(url))
    async with open_store(url) as store:
        await ensure_schema(store)
        yield store


def _require_sqlite_file(config: Config, path: str) -> None:
    from gateway.store.sqlite import MEMORY

    if path == MEMORY or Path(path).exists():
        return
    # Name the variable that chose the path: that is the one to check.
    if config.environ.get(PREFIX + "DATABASE_URL", "").strip():
        source, fix = f"{PREFIX}DATABASE_URL", f"correct {PREFIX}DATABASE_URL"
    else:
        data_dir_set = config.environ.get(PREFIX + "DATA_DIR", "").strip()
        source = f"{PREFIX}DATA_DIR{'=' if data_dir_set else ' unset: '}{config.data_dir}"
        fix = f"set {PREFIX}DATA_DIR to the gateway's data dir"
    raise ConfigError(
        [
            f"no database at {Path(path).absolute()} ({source}): "
            f"create it with `switchboard migrate`, or {fix}"
        ]
    )


# ---- config ----


def cmd_config_check(_: argparse.Namespace) -> int:
    from gateway.domain.channel import ChannelContext
    from gateway.plugins import load_channels

    config = _load_config()
    rows = [
        (name, _key_ring_source(config) if name == KEYS_VARIABLE else value)
        for name, value in config.describe()
    ]
    channels = load_channels(
        ChannelContext(
            environ=config.environ, public_url=config.public_url, embedded=config.embedded
        )
    )
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for name in channels:
        info = channels[name].info()
        flows = ", ".join(
            f"{f.name}{'' if f.configured else ' (not configured)'}" for f in info.login_flows
        )
        if info.sandbox and not info.configured:
            # A sandbox URL without credentials: the plugin takes the sandbox's at start,
            # which this check (no network) does not do.
            flows = "those the sandbox has, taken from it at start"
        mode = (
            "sandbox" if info.sandbox else ("configured" if info.configured else "not configured")
        )
        print(f"{'channel ' + name:<{width}}  {mode}; login flows: {flows}")
    for name in config.ignored:
        print(f"warning: {name} is not a Switchboard variable; it is ignored", file=sys.stderr)
    print("configuration OK")
    return 0


KEYS_VARIABLE = PREFIX + "ENCRYPTION_KEYS"


def _key_ring_source(config: Config) -> str:
    """Where the key ring comes from: the variable (masked), else the embedded default's key
    file, which "(unset)" would hide (and which a backup must include)."""
    from gateway.security.keyring import KEY_FILE_NAME

    if config.encryption_keys.reveal():
        return str(config.encryption_keys)
    path = Path(config.data_dir) / KEY_FILE_NAME
    made = "" if path.exists() else ", generated on the first start"
    return f"(unset: the key file {path}{made})"


# ---- tokens ----


def cmd_tokens(args: argparse.Namespace) -> int:
    from gateway.security.tokens import create_token

    config = _load_config()

    async def main() -> int:
        async with _open_migrated_store(config) as store:
            if args.tokens_command == "create":
                token, _ = await create_token(
                    store, name=args.name, tenants=args.tenant or ["*"], scopes=args.scope or []
                )
                print(token)
            elif args.tokens_command == "list":
                async with store.transaction() as tx:
                    records = await tx.list_api_tokens()
                for r in records:
                    state = "revoked" if r.revoked_at else "active"
                    scopes = "+".join(sorted(s.value for s in r.scopes))
                    print(f"{r.id}\t{r.name}\t{','.join(r.tenants)}\t{scopes}\t{state}")
            else:
                from datetime import UTC, datetime

                async with store.transaction() as tx:
                    count = await tx.revoke_api_token(args.token, datetime.now(UTC))
                if not count:
                    print(f"no active token with id or name {args.token!r}", file=sys.stderr)
                    return 1
                print(f"revoked {count} token(s)")
        return 0

    return _run(main)


# ---- groups ----


def cmd_groups(args: argparse.Namespace) -> int:
    config = _load_config()
    url = config.redis_url.reveal()
    if not url:
        # The in-process bus keeps its groups in the gateway's own process and store.
        print(
            "groups: only with SWITCHBOARD_REDIS_URL (the Redis bus); the embedded default"
            " keeps its groups in the gateway's process",
            file=sys.stderr,
        )
        return 2

    async def main() -> int:
        from gateway.bus import RedisBus

        async with RedisBus(url, key_prefix=config.redis_key_prefix) as bus:
            if args.groups_command == "list":
                for group in await bus.known_groups():
                    lag = await bus.group_lag(group)
                    live = await bus.live_consumers(group)
                    print(f"{group}\tlag {lag}\tconsumers {live}")
                return 0
            if await bus.live_consumers(args.group):
                print(
                    f"group {args.group!r} has consumers reading it: stop them first",
                    file=sys.stderr,
                )
                return 1
            if not await bus.delete_group(args.group):
                print(f"no group named {args.group!r}", file=sys.stderr)
                return 1
            print(f"deleted group {args.group!r}")
            return 0

    return _run(main)


# ---- keys ----


def cmd_keys_rotate(_: argparse.Namespace) -> int:
    from gateway.security.keyring import KeyRing
    from gateway.services.credentials import rotate_credentials

    config = _load_config()

    async def main() -> int:
        # The store first: run from the wrong directory, the missing database is what to
        # say, not the key ring that the same data dir would have held.
        async with _open_migrated_store(config) as store:
            # Rotation never invents a key: a missing ring is a configuration problem here.
            keyring = KeyRing.load(
                config.encryption_keys.reveal(), data_dir=config.data_dir, allow_generate=False
            )
            report = await rotate_credentials(store, keyring)
        print(
            f"credentials: {report.total}; re-encrypted with key {keyring.primary_key_id}: "
            f"{report.rotated}; already current: {report.current}; failed: {report.failed}"
        )
        return 1 if report.failed else 0

    return _run(main)


# ---- sandbox ----


def cmd_sandbox(args: argparse.Namespace) -> int:
    from channels.instagram.sandbox import SandboxSettingsError, run_sandbox

    try:
        level = log_level_from(os.environ)
    except ConfigError as exc:
        print(f"switchboard sandbox: {exc}", file=sys.stderr)
        return 2
    configure_logging(level, "text" if sys.stderr.isatty() else "json")
    try:
        run_sandbox(args.addr, dict(os.environ))
    except (SandboxSettingsError, ValueError) as exc:
        print(f"switchboard sandbox: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"switchboard sandbox: cannot listen on {args.addr}: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_version(_: argparse.Namespace) -> int:
    print(f"switchboard {__version__}")
    return 0


def _not_blank(flag: str, every: str) -> Callable[[str], str]:
    """An empty value is refused rather than read as "not given": from an unset shell
    variable, it would otherwise mint a token for every tenant or with every scope.
    ``every``: how to ask for all of them instead."""

    def parse(value: str) -> str:
        if not value.strip():
            raise argparse.ArgumentTypeError(f"{flag} must not be empty ({every})")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switchboard", description="Multi-channel messaging gateway.", epilog=CONFIG_EPILOG
    )
    parser.add_argument("--version", action="version", version=f"switchboard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve", help="run the gateway", description="Run the gateway.", epilog=CONFIG_EPILOG
    )
    serve.add_argument(
        "role",
        nargs="?",
        default="all",
        choices=["all", "grpc", "http"],
        help="what this process serves (default all; a pod runs grpc and http apart)",
    )
    serve.add_argument(
        "--dev",
        action="store_true",
        help="create or reuse a local dev API token and print it with the addresses",
    )
    serve.set_defaults(func=cmd_serve)

    migrate = sub.add_parser("migrate", help="apply pending database migrations")
    migrate.set_defaults(func=cmd_migrate)

    config = sub.add_parser("config", help="configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate and print the effective configuration")
    check.set_defaults(func=cmd_config_check)

    tokens = sub.add_parser("tokens", help="API tokens")
    tokens_sub = tokens.add_subparsers(dest="tokens_command", required=True)
    create = tokens_sub.add_parser("create", help="create a token and print it on stdout")
    create.add_argument("--name", required=True)
    create.add_argument(
        "--tenant",
        action="append",
        type=_not_blank("--tenant", "use '*' for every tenant"),
        help="a tenant id, or '*' (repeatable; default '*', every tenant)",
    )
    create.add_argument(
        "--scope",
        action="append",
        type=_not_blank("--scope", "leave it out for every scope"),
        help="connect, send, read, subscribe or admin (repeatable; default all)",
    )
    create.set_defaults(func=cmd_tokens)
    listing = tokens_sub.add_parser("list", help="list tokens (never their values)")
    listing.set_defaults(func=cmd_tokens)
    revoke = tokens_sub.add_parser("revoke", help="revoke a token by id or name")
    revoke.add_argument("token", metavar="ID_OR_NAME")
    revoke.set_defaults(func=cmd_tokens)

    groups = sub.add_parser("groups", help="Subscribe groups on the Redis bus")
    groups_sub = groups.add_subparsers(dest="groups_command", required=True)
    groups_sub.add_parser("list", help="every group, with its lag and live consumers").set_defaults(
        func=cmd_groups
    )
    delete = groups_sub.add_parser(
        "delete",
        help="retire a group nobody reads any more (its lag stops being reported)",
    )
    delete.add_argument("group")
    delete.set_defaults(func=cmd_groups)

    keys = sub.add_parser("keys", help="credential encryption keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    rotate = keys_sub.add_parser(
        "rotate", help="re-encrypt every credential with the first key of the ring"
    )
    rotate.set_defaults(func=cmd_keys_rotate)

    sandbox = sub.add_parser("sandbox", help="run the Instagram sandbox (Meta's stand-in)")
    sandbox.add_argument("--addr", default="127.0.0.1:8090", help="HOST:PORT (default %(default)s)")
    sandbox.set_defaults(func=cmd_sandbox)

    ver = sub.add_parser("version", help="print the version")
    ver.set_defaults(func=cmd_version)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"switchboard: config: {problem}", file=sys.stderr)
        return 2
    except InvalidArgument as exc:
        print(f"switchboard: {exc.message}", file=sys.stderr)
        return 2
    except StoreUnavailable as exc:
        reason = _postgres_refusal()
        print(f"switchboard: {exc.message}{': ' + reason if reason else ''}", file=sys.stderr)
        return 1
    except SwitchboardError as exc:
        print(f"switchboard: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _postgres_refusal() -> str:
    """Why PostgreSQL refuses this configuration, in libpq's words (a role or database that
    does not exist, a port nobody listens on): the pool only says it timed out, the cause
    being in its warning lines. The URL parsed (Config checked it), so libpq's words name
    the host, port, user and database, never the password."""
    try:
        config = Config.from_environ()
    except ConfigError:
        return ""
    if config.database_backend != "postgres":
        return ""
    import psycopg

    try:
        psycopg.connect(config.database_url.reveal(), connect_timeout=5).close()
    except psycopg.Error as exc:
        return " ".join(str(exc).split())
    return ""


if __name__ == "__main__":
    sys.exit(main())
