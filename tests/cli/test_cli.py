"""The command line, run as a user runs it: a subprocess with an environment."""

from __future__ import annotations

import secrets
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from gateway.bus import RedisBus
from gateway.domain.bus import Subscription
from gateway.security.keyring import generate_key_spec
from tests.bus.conftest import make_event
from tests.helpers import fresh_database, switchboard

STORE_COMMANDS = [
    ("tokens", "create", "--name", "x"),
    ("tokens", "list"),
    ("tokens", "revoke", "x"),
    ("keys", "rotate"),
]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {
        "SWITCHBOARD_DATABASE_URL": f"sqlite:///{tmp_path}/cli.db",
        "SWITCHBOARD_DATA_DIR": str(tmp_path),
        "SWITCHBOARD_ENCRYPTION_KEYS": generate_key_spec("k1"),
        "SWITCHBOARD_LOG_FORMAT": "json",
    }


def test_bad_configuration_exits_2_with_one_line_per_problem(env: dict[str, str]) -> None:
    env |= {"SWITCHBOARD_GRPC_ADDR": "nope", "SWITCHBOARD_LOG_LEVEL": "loud"}
    result = switchboard("config", "check", env=env)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 2
    assert any("SWITCHBOARD_GRPC_ADDR" in line for line in lines)
    assert any("SWITCHBOARD_LOG_LEVEL" in line for line in lines)


def test_the_channels_problems_are_reported_with_the_gateways(env: dict[str, str]) -> None:
    env |= {"SWITCHBOARD_LOG_LEVEL": "loud", "INSTAGRAM_APP_ID": "not-a-number"}
    result = switchboard("config", "check", env=env)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert any("SWITCHBOARD_LOG_LEVEL" in line for line in lines)
    assert any("INSTAGRAM_APP_ID" in line for line in lines)


def test_config_check_prints_the_effective_configuration_masked(env: dict[str, str]) -> None:
    env["SWITCHBOARD_REDIS_URL"] = "redis://:sekritpass@127.0.0.1:6379/0"
    result = switchboard("config", "check", env=env)
    assert result.returncode == 0, result.stderr
    assert "SWITCHBOARD_GRPC_ADDR" in result.stdout
    assert "redis://:***@127.0.0.1:6379/0" in result.stdout
    assert "sekritpass" not in result.stdout
    assert env["SWITCHBOARD_ENCRYPTION_KEYS"].split(":", 1)[1] not in result.stdout
    assert "channel instagram" in result.stdout


def test_config_check_says_a_sandbox_url_alone_gives_the_sandboxs_credentials(
    env: dict[str, str],
) -> None:
    """Not 'not configured': the gateway takes the sandbox's credentials when it starts."""
    env["INSTAGRAM_SANDBOX_URL"] = "http://127.0.0.1:9"
    result = switchboard("config", "check", env=env)
    assert result.returncode == 0, result.stderr
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("channel instagram")]
    assert line.split(None, 2)[2] == (
        "sandbox; login flows: those the sandbox has, taken from it at start"
    )


def test_config_check_names_the_key_file_the_embedded_default_uses(
    env: dict[str, str], tmp_path: Path
) -> None:
    del env["SWITCHBOARD_ENCRYPTION_KEYS"]
    env["SWITCHBOARD_SPARE_SETTING"] = "1"
    key_file = tmp_path / "encryption.keys"
    before = switchboard("config", "check", env=env)
    assert before.returncode == 0, before.stderr
    assert f"(unset: the key file {key_file}, generated on the first start)" in before.stdout
    # A warning is not the configuration: it goes where warnings go.
    assert "SWITCHBOARD_SPARE_SETTING is not a Switchboard variable" in before.stderr
    assert "SPARE" not in before.stdout

    key_file.write_text(generate_key_spec("k9") + "\n")
    after = switchboard("config", "check", env=env)
    assert after.returncode == 0, after.stderr
    shown = next(line for line in after.stdout.splitlines() if "ENCRYPTION_KEYS" in line)
    assert shown.split(None, 1)[1] == f"(unset: the key file {key_file})"


def test_migrate_twice_is_a_no_op(env: dict[str, str]) -> None:
    first = switchboard("migrate", env=env)
    assert first.returncode == 0, first.stderr
    assert "applied" in first.stdout
    second = switchboard("migrate", env=env)
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stdout


def test_tokens_create_prints_the_token_alone_and_list_never_shows_it(env: dict[str, str]) -> None:
    assert switchboard("migrate", env=env).returncode == 0
    created = switchboard(
        "tokens",
        "create",
        "--name",
        "ai-backend",
        "--tenant",
        "acme",
        "--scope",
        "subscribe",
        "--scope",
        "send",
        env=env,
    )
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert created.stdout == token + "\n"
    assert token.startswith("sb_")
    listed = switchboard("tokens", "list", env=env)
    assert "ai-backend" in listed.stdout
    assert "acme" in listed.stdout
    assert "send+subscribe" in listed.stdout
    assert token not in listed.stdout + listed.stderr
    revoked = switchboard("tokens", "revoke", "ai-backend", env=env)
    assert revoked.returncode == 0
    assert "revoked" in switchboard("tokens", "list", env=env).stdout


def test_unknown_scope_is_a_usage_error(env: dict[str, str]) -> None:
    assert switchboard("migrate", env=env).returncode == 0
    result = switchboard("tokens", "create", "--name", "x", "--scope", "everything", env=env)
    assert result.returncode == 2
    assert "scope" in result.stderr


@pytest.mark.parametrize(
    ("flag", "hint"),
    [("--tenant", "use '*' for every tenant"), ("--scope", "leave it out for every scope")],
)
def test_an_empty_tenant_or_scope_is_a_usage_error_not_every_one(
    env: dict[str, str], flag: str, hint: str
) -> None:
    """From an unset shell variable it would otherwise mint an all-powerful token."""
    assert switchboard("migrate", env=env).returncode == 0
    result = switchboard("tokens", "create", "--name", "x", flag, "", env=env)
    assert result.returncode == 2
    assert f"{flag} must not be empty ({hint})" in result.stderr
    assert "x" not in switchboard("tokens", "list", env=env).stdout.split()


def test_the_default_database_follows_the_data_dir(tmp_path: Path) -> None:
    env = {"SWITCHBOARD_DATA_DIR": str(tmp_path / "data"), "SWITCHBOARD_LOG_FORMAT": "json"}
    assert switchboard("migrate", env=env, cwd=tmp_path).returncode == 0
    created = switchboard("tokens", "create", "--name", "x", env=env, cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    assert (tmp_path / "data" / "switchboard.db").exists()
    assert not (tmp_path / "var").exists()


@pytest.mark.parametrize("command", STORE_COMMANDS, ids=" ".join)
def test_a_store_command_without_a_database_says_to_migrate_and_creates_nothing(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    """Run from the wrong directory, it would otherwise fill a database nobody serves."""
    env = {
        "SWITCHBOARD_ENCRYPTION_KEYS": generate_key_spec("k1"),
        "SWITCHBOARD_LOG_FORMAT": "json",
    }
    result = switchboard(*command, env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        f"switchboard: config: no database at {tmp_path}/var/switchboard.db "
        "(SWITCHBOARD_DATA_DIR unset: ./var): create it with `switchboard migrate`, "
        "or set SWITCHBOARD_DATA_DIR to the gateway's data dir\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_keys_rotate_on_the_embedded_default_elsewhere_names_the_missing_database(
    tmp_path: Path,
) -> None:
    """Without SWITCHBOARD_ENCRYPTION_KEYS the key ring lives in the data dir too: from
    the wrong directory, the database is what to name, not a variable it does not need."""
    result = switchboard("keys", "rotate", env={"SWITCHBOARD_LOG_FORMAT": "json"}, cwd=tmp_path)
    assert result.returncode == 2
    assert "no database at" in result.stderr
    assert "SWITCHBOARD_ENCRYPTION_KEYS" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_missing_database_named_by_its_url_names_that_variable(
    env: dict[str, str], tmp_path: Path
) -> None:
    env["SWITCHBOARD_DATABASE_URL"] = f"sqlite:///{tmp_path}/nowhere/cli.db"
    result = switchboard("tokens", "list", env=env)
    assert result.returncode == 2
    assert "no database at" in result.stderr
    assert "(SWITCHBOARD_DATABASE_URL)" in result.stderr
    assert not (tmp_path / "nowhere").exists()


def test_an_existing_sqlite_database_is_migrated_as_serve_does(env: dict[str, str]) -> None:
    """An empty file (what earlier versions left behind) is a database not migrated yet."""
    Path(env["SWITCHBOARD_DATA_DIR"], "cli.db").touch()
    created = switchboard("tokens", "create", "--name", "x", env=env)
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip().startswith("sb_")
    assert "applied migrations" in created.stderr
    assert "x" in switchboard("tokens", "list", env=env).stdout.split()


@pytest.mark.parametrize("command", STORE_COMMANDS, ids=" ".join)
def test_a_postgres_database_never_migrated_is_refused_in_one_line(
    env: dict[str, str], postgres_admin_url: str, command: tuple[str, ...]
) -> None:
    with fresh_database(postgres_admin_url, "cli") as url:
        env["SWITCHBOARD_DATABASE_URL"] = url
        result = switchboard(*command, env=env)
    assert result.returncode == 2
    assert result.stderr == (
        "switchboard: config: the database is not migrated: run `switchboard migrate`\n"
    )


def test_a_postgres_database_behind_names_the_pending_migrations(
    env: dict[str, str], postgres_admin_url: str
) -> None:
    with fresh_database(postgres_admin_url, "cli") as url:
        env["SWITCHBOARD_DATABASE_URL"] = url
        with psycopg.connect(url, autocommit=True) as db:
            db.execute(
                "CREATE TABLE schema_migrations (version TEXT PRIMARY KEY,"
                " applied_at TIMESTAMPTZ NOT NULL)"
            )
            db.execute("INSERT INTO schema_migrations VALUES ('0001_init', now())")
        result = switchboard("tokens", "list", env=env)
    assert result.returncode == 2
    assert result.stderr.startswith(
        "switchboard: config: the database schema is behind (0002_inbound, "
    )
    assert result.stderr.endswith(" pending): run `switchboard migrate`\n")


@pytest.mark.parametrize("command", [(), ("serve",)], ids=["switchboard", "serve"])
def test_the_help_points_at_the_configuration(
    env: dict[str, str], command: tuple[str, ...]
) -> None:
    result = switchboard(*command, "--help", env=env)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "SWITCHBOARD_* environment variables" in text
    assert "`switchboard config check`" in text
    assert "README's Configuration section" in text


def test_version(env: dict[str, str]) -> None:
    result = switchboard("version", env=env)
    assert result.returncode == 0
    assert result.stdout.startswith("switchboard ")


async def test_groups_lists_and_retires_subscribe_groups_on_the_redis_bus(
    env: dict[str, str], redis_url: str, redis_prefix: str
) -> None:
    prefix = f"{redis_prefix}cli{secrets.token_hex(3)}:"
    env |= {"SWITCHBOARD_REDIS_URL": redis_url, "SWITCHBOARD_REDIS_KEY_PREFIX": prefix}
    bus = RedisBus(redis_url, key_prefix=prefix, shards=2, block_ms=100)
    async with bus, bus.subscribe(Subscription("ai", "backend-1")):
        await bus.publish([make_event("conv1", 0)])
        listed = switchboard("groups", "list", env=env)
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.splitlines() == ["ai\tlag 1\tconsumers 1"]
        busy = switchboard("groups", "delete", "ai", env=env)
        assert busy.returncode == 1
        assert "has consumers reading it" in busy.stderr
    # The backend went away for good: the group is retired, its lag no longer reported.
    assert switchboard("groups", "list", env=env).stdout == "ai\tlag 1\tconsumers 0\n"
    deleted = switchboard("groups", "delete", "ai", env=env)
    assert deleted.returncode == 0, deleted.stderr
    assert switchboard("groups", "list", env=env).stdout == ""
    assert switchboard("groups", "delete", "ai", env=env).returncode == 1


def test_groups_needs_the_redis_bus(env: dict[str, str]) -> None:
    result = switchboard("groups", "list", env=env)
    assert result.returncode == 2
    assert "SWITCHBOARD_REDIS_URL" in result.stderr


@pytest.mark.postgres
def test_a_database_that_refuses_the_login_is_named_in_libpqs_words(
    postgres_admin_url: str, tmp_path: Path
) -> None:
    """The pool only says it timed out; the operator needs libpq's reason on the last line."""
    role = f"nobody_{secrets.token_hex(3)}"
    parts = urlsplit(postgres_admin_url)
    url = urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.rpartition('@')[2]}"))
    env = {"SWITCHBOARD_DATABASE_URL": url, "SWITCHBOARD_LOG_FORMAT": "json"}
    result = switchboard("migrate", env=env, cwd=tmp_path)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("switchboard: PostgreSQL is unavailable")
    assert f'role "{role}" does not exist' in last
