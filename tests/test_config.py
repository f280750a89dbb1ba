from __future__ import annotations

import os

import pytest

from channels.instagram.settings import InstagramSettings
from clients.examples.quickstart import default_token_file
from gateway.config import Config, Secret, grpc_target_from, parse_address
from gateway.domain.errors import ConfigError
from gateway.security.keyring import generate_key_spec
from gateway.store import sqlite_path


def test_defaults_are_the_embedded_gateway() -> None:
    config = Config.from_environ({})
    assert config.database_url.reveal() == "sqlite:///./var/switchboard.db"
    assert config.embedded
    assert str(config.grpc_addr) == "127.0.0.1:50051"
    assert str(config.http_addr) == "127.0.0.1:8080"
    assert str(config.metrics_addr) == "127.0.0.1:9464"
    assert config.allowed_return_origins == ("http://127.0.0.1:8080",)


@pytest.mark.parametrize(
    ("data_dir", "url"),
    [
        ("/srv/switchboard", "sqlite:////srv/switchboard/switchboard.db"),
        ("/srv/switchboard/", "sqlite:////srv/switchboard/switchboard.db"),
        ("data", "sqlite:///data/switchboard.db"),
        ("./var", "sqlite:///./var/switchboard.db"),
    ],
)
def test_the_default_database_lives_in_the_data_dir(data_dir: str, url: str) -> None:
    """Keys and the dev token go to the data dir; a database left behind would not match."""
    config = Config.from_environ({"SWITCHBOARD_DATA_DIR": data_dir})
    assert config.database_url.reveal() == url
    assert sqlite_path(url) == os.path.join(data_dir, "switchboard.db")
    assert dict(config.describe())["SWITCHBOARD_DATABASE_URL"] == url
    assert config.embedded


def test_an_explicit_database_url_wins_over_the_data_dir() -> None:
    config = Config.from_environ(
        {
            "SWITCHBOARD_DATA_DIR": "/srv/switchboard",
            "SWITCHBOARD_DATABASE_URL": "sqlite:////elsewhere/sb.db",
        }
    )
    assert config.database_url.reveal() == "sqlite:////elsewhere/sb.db"
    assert config.data_dir == "/srv/switchboard"


def test_the_examples_dial_the_grpc_address_the_gateway_is_given() -> None:
    assert grpc_target_from({}) == "127.0.0.1:50051"
    assert grpc_target_from({"SWITCHBOARD_GRPC_ADDR": "127.0.0.1:50791"}) == "127.0.0.1:50791"
    # A server on every interface is dialled on this machine's loopback.
    assert grpc_target_from({"SWITCHBOARD_GRPC_ADDR": "0.0.0.0:6000"}) == "127.0.0.1:6000"
    assert grpc_target_from({"SWITCHBOARD_GRPC_ADDR": "[::]:6000"}) == "[::1]:6000"
    assert grpc_target_from({"SWITCHBOARD_GRPC_ADDR": "nope"}) == "nope"


def test_the_quickstart_looks_for_the_dev_token_in_the_data_dir() -> None:
    assert default_token_file({}) == os.path.join("./var", "dev-token")
    assert default_token_file({"SWITCHBOARD_DATA_DIR": "/srv/sb"}) == "/srv/sb/dev-token"


def test_every_problem_is_reported_on_its_own_line() -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_environ(
            {
                "SWITCHBOARD_DATABASE_URL": "mysql://x",
                "SWITCHBOARD_GRPC_ADDR": "nohost",
                "SWITCHBOARD_HTTP_ADDR": "127.0.0.1:99999",
                "SWITCHBOARD_LOG_LEVEL": "loud",
                "SWITCHBOARD_ALLOWED_RETURN_ORIGINS": "https://ok.example,ftp://bad/path",
                "SWITCHBOARD_ENCRYPTION_KEYS": "k1:notbase64!",
            }
        )
    problems = caught.value.problems
    assert len(problems) == 6
    joined = "\n".join(problems)
    for name in (
        "SWITCHBOARD_DATABASE_URL",
        "SWITCHBOARD_GRPC_ADDR",
        "SWITCHBOARD_HTTP_ADDR",
        "SWITCHBOARD_LOG_LEVEL",
        "SWITCHBOARD_ALLOWED_RETURN_ORIGINS",
        "SWITCHBOARD_ENCRYPTION_KEYS",
    ):
        assert name in joined


def test_secrets_are_masked_in_repr_and_description() -> None:
    key = generate_key_spec("k1")
    config = Config.from_environ(
        {
            "SWITCHBOARD_DATABASE_URL": "postgresql://app:hunter2hunter2@db:5432/sb",
            "SWITCHBOARD_REDIS_URL": "redis://:redispassword@redis:6379/0",
            "SWITCHBOARD_ENCRYPTION_KEYS": key,
            "SWITCHBOARD_API_TOKENS": "a-static-token-of-enough-length@acme/send",
        }
    )
    text = repr(config) + str(config.describe())
    for secret in ("hunter2hunter2", "redispassword", key.split(":", 1)[1], "a-static-token"):
        assert secret not in text
    described = dict(config.describe())
    assert described["SWITCHBOARD_DATABASE_URL"] == "postgresql://app:***@db:5432/sb"
    assert described["SWITCHBOARD_ENCRYPTION_KEYS"] == "***"
    assert repr(Secret("x")) == "Secret('***')"


@pytest.mark.parametrize(
    ("database", "redis_url", "shown"),
    [
        # libpq takes a password holding # or ? as typed; urllib would end the host there.
        ("postgresql://app:S3cret#Pw_G@db:1/sb", "", "postgresql://app:***@db:1/sb"),
        ("postgresql://app:S3c?ret_K@db/sb", "", "postgresql://app:***@db/sb"),
        (
            "postgresql:///sb?host=/run/pg&password=S3cretQ",
            "",
            "postgresql:///sb?host=/run/pg&password=***",
        ),
        ("postgresql://app@db/sb", "redis://:Redis%23Pw_X@r:6379/0", "postgresql://app@db/sb"),
    ],
)
def test_passwords_are_masked_however_they_are_written(
    database: str, redis_url: str, shown: str
) -> None:
    env = {
        "SWITCHBOARD_DATABASE_URL": database,
        "SWITCHBOARD_ENCRYPTION_KEYS": generate_key_spec("k1"),
    }
    if redis_url:
        env["SWITCHBOARD_REDIS_URL"] = redis_url
    described = dict(Config.from_environ(env).describe())
    assert described["SWITCHBOARD_DATABASE_URL"] == shown
    for secret in ("S3cret", "S3c?ret", "Pw_X", "Redis"):
        assert secret not in str(described)


@pytest.mark.parametrize(
    ("variable", "url"),
    [
        ("SWITCHBOARD_DATABASE_URL", "postgresql://app:S3cret Pw_T@127.0.0.1:1/db"),
        ("SWITCHBOARD_DATABASE_URL", "postgresql://app:pa%zzss_L@127.0.0.1/db"),
        ("SWITCHBOARD_DATABASE_URL", "postgresql://app:S3cretPw_I@[::1/db"),
        # libpq reads these, but ends the password at the first '@' or '/': the rest
        # becomes the host (then logged as one that does not resolve) or the database.
        ("SWITCHBOARD_DATABASE_URL", "postgresql://app:S3cret@Pw_A@127.0.0.1:5432/db"),
        ("SWITCHBOARD_DATABASE_URL", "postgresql://app:S3cret/Pw_S@127.0.0.1/db"),
        ("SWITCHBOARD_REDIS_URL", "redis://:Redis#Pw_X@127.0.0.1:6379/0"),
    ],
)
def test_a_url_its_client_cannot_read_is_one_line_that_never_quotes_it(
    variable: str, url: str
) -> None:
    """The clients' own errors quote what they could not read, which may be the password."""
    with pytest.raises(ConfigError) as caught:
        Config.from_environ({variable: url})
    (problem,) = caught.value.problems
    assert problem.startswith(f"{variable}: ")
    assert "percent-encode" in problem
    for secret in ("S3cret", "pa%zz", "Pw_"):
        assert secret not in problem


def test_a_port_that_is_not_a_number_is_refused_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_environ({"SWITCHBOARD_DATABASE_URL": "postgresql://app@db:notaport/sb"})
    assert caught.value.problems == ["SWITCHBOARD_DATABASE_URL: the port is not a number"]


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:50051", "127.0.0.1", 50051),
        ("[::1]:0", "::1", 0),
        ("0.0.0.0:8080", "0.0.0.0", 8080),
    ],
)
def test_addresses_parse(text: str, host: str, port: int) -> None:
    address = parse_address(text)
    assert (address.host, address.port) == (host, port)


def test_return_origins_are_normalised_origins() -> None:
    config = Config.from_environ(
        {"SWITCHBOARD_ALLOWED_RETURN_ORIGINS": "https://App.Example.com, http://localhost:3000/"}
    )
    assert config.allowed_return_origins == ("https://app.example.com", "http://localhost:3000")


def test_the_description_names_the_variables_that_are_read() -> None:
    """Every line of `config check` is a variable and value that, set, give this config."""
    config = Config.from_environ(
        {
            "SWITCHBOARD_SHUTDOWN_GRACE_SECONDS": "5",
            "SWITCHBOARD_TOKEN_REFRESH_MARGIN_DAYS": "7",
            "SWITCHBOARD_SEND_RATE_TEXT_PER_SECOND": "40",
            "SWITCHBOARD_SEND_WAIT_SECONDS": "0.5",
            "SWITCHBOARD_WEBHOOK_ACK_TIMEOUT_SECONDS": "3",
            "SWITCHBOARD_WEBHOOK_ECHO_WAIT_MS": "20",
            "SWITCHBOARD_SEND_LEASE_SECONDS": "90",
            "SWITCHBOARD_DATABASE_POOL_SIZE": "6",
            "SWITCHBOARD_LOG_FORMAT": "json",
        }
    )
    described = dict(config.describe())
    assert described["SWITCHBOARD_SEND_LEASE_SECONDS"] == "90.0"
    assert described["SWITCHBOARD_DATABASE_POOL_SIZE"] == "6"
    assert config.database_pool_size == 6
    assert described["SWITCHBOARD_SHUTDOWN_GRACE_SECONDS"] == "5.0"
    assert described["SWITCHBOARD_TOKEN_REFRESH_MARGIN_DAYS"] == "7"
    assert described["SWITCHBOARD_SEND_RATE_TEXT_PER_SECOND"] == "40.0"
    assert described["SWITCHBOARD_WEBHOOK_ECHO_WAIT_MS"] == "20"
    assert config.webhook_echo_wait_s == pytest.approx(0.02)
    again = Config.from_environ({k: v for k, v in described.items() if v != "(unset)"})
    assert again.ignored == ()
    assert again == config


@pytest.mark.parametrize("value", ["1", "7200", "soon"])
def test_a_send_lease_out_of_range_is_refused(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_environ({"SWITCHBOARD_SEND_LEASE_SECONDS": value})
    assert [p.split(":")[0] for p in caught.value.problems] == ["SWITCHBOARD_SEND_LEASE_SECONDS"]


@pytest.mark.parametrize("value", ["3", "501", "2.5x"])
def test_a_pool_size_out_of_range_is_refused(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_environ({"SWITCHBOARD_DATABASE_POOL_SIZE": value})
    assert [p.split(":")[0] for p in caught.value.problems] == ["SWITCHBOARD_DATABASE_POOL_SIZE"]


def test_unknown_variables_are_reported_as_ignored() -> None:
    config = Config.from_environ(
        {
            "SWITCHBOARD_SHUTDOWN_GRACE_S": "5",  # not the variable's name
            "SWITCHBOARD_SEND_WAIT_SECONDS": "1",
            "SWITCHBOARD_TEST_DATABASE_URL": "postgresql://db/test",  # the test suite's
            "OTHER_VARIABLE": "x",
        }
    )
    assert config.ignored == ("SWITCHBOARD_SHUTDOWN_GRACE_S",)
    assert config.shutdown_grace_s == 10.0


def test_meta_credentials_need_the_webhook_verify_token() -> None:
    """A generated token would differ on every replica and restart, and Meta's webhook
    verification would fail with nothing said at start."""
    public = "https://sb.example.com"
    with pytest.raises(ConfigError, match="INSTAGRAM_WEBHOOK_VERIFY_TOKEN"):
        InstagramSettings.from_environ(
            {"INSTAGRAM_APP_ID": "111", "INSTAGRAM_APP_SECRET": "s"}, public
        )
    with pytest.raises(ConfigError, match="INSTAGRAM_WEBHOOK_VERIFY_TOKEN"):
        InstagramSettings.from_environ(
            {"FACEBOOK_APP_ID": "222", "FACEBOOK_APP_SECRET": "s"}, public
        )
    given = InstagramSettings.from_environ(
        {
            "INSTAGRAM_APP_ID": "111",
            "INSTAGRAM_APP_SECRET": "s",
            "INSTAGRAM_WEBHOOK_VERIFY_TOKEN": "vt",
        },
        public,
    )
    assert given.webhook_verify_token.reveal() == "vt"
    # The sandbox needs no setup: its token is generated.
    assert InstagramSettings.from_environ({}, public).webhook_verify_token.reveal()


def test_the_public_url_follows_the_sidecars_address_unless_set() -> None:
    """Moving the sidecar to another port must not leave OAuth redirects and webhooks
    pointing at the old one."""
    assert Config.from_environ({}).public_url == "http://127.0.0.1:8080"
    moved = Config.from_environ({"SWITCHBOARD_HTTP_ADDR": "127.0.0.1:9090"})
    assert moved.public_url == "http://127.0.0.1:9090"
    everywhere = Config.from_environ({"SWITCHBOARD_HTTP_ADDR": "0.0.0.0:8081"})
    assert everywhere.public_url == "http://127.0.0.1:8081"
    given = {"SWITCHBOARD_HTTP_ADDR": "0.0.0.0:8081", "SWITCHBOARD_PUBLIC_URL": "https://x.test"}
    assert Config.from_environ(given).public_url == "https://x.test"


def test_facebook_login_may_ask_for_more_permissions() -> None:
    public = "https://sb.example.com"
    plain = InstagramSettings.from_environ({}, public)
    assert "business_management" not in plain.facebook_scopes
    more = InstagramSettings.from_environ(
        {"FACEBOOK_LOGIN_EXTRA_SCOPES": " business_management, pages_show_list ,"}, public
    )
    assert more.facebook_scopes == (*plain.facebook_scopes, "business_management")
    with pytest.raises(ConfigError, match="FACEBOOK_LOGIN_EXTRA_SCOPES"):
        InstagramSettings.from_environ({"FACEBOOK_LOGIN_EXTRA_SCOPES": "all please"}, public)
