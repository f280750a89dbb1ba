from __future__ import annotations

import pytest

from gateway.config import Config, Secret, parse_address
from gateway.domain.errors import ConfigError
from gateway.security.keyring import generate_key_spec


def test_defaults_are_the_embedded_gateway() -> None:
    config = Config.from_environ({})
    assert config.database_url.reveal() == "sqlite:///./var/switchboard.db"
    assert config.embedded
    assert str(config.grpc_addr) == "127.0.0.1:50051"
    assert str(config.http_addr) == "127.0.0.1:8080"
    assert str(config.metrics_addr) == "127.0.0.1:9464"
    assert config.allowed_return_origins == ("http://127.0.0.1:8080",)


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
