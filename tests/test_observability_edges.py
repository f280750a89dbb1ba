"""Observability edges: a password in a URL's query kept out of `config check`; messages
that fail before any attempt counted as failed sends; Meta calls besides the Send API
timed by endpoint; gRPC message counters as grpc-prometheus counts them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from gateway.config import Config
from gateway.security.keyring import generate_key_spec
from gateway.services.connection_status import mark_needs_reauth

# The outbound fixtures (a whole gateway, a sandbox account, a customer who wrote).
from tests.helpers import switchboard
from tests.outbound.conftest import (  # noqa: F401
    Out,
    out,
    out_backend,
    out_database,
    out_environ,
    sandbox,
)

DB_PASSWORD = "pgQueryPassw0rdXYZ"
REDIS_PASSWORD = "redisQueryPassw0rdXYZ"


def _samples(name: str, **labels: str) -> Iterator[tuple[dict[str, str], float]]:
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                yield sample.labels, sample.value


def _sum(name: str, **labels: str) -> float:
    return sum(value for _, value in _samples(name, **labels))


# ---- secrets in `config check` --------------------------------------------------------


def test_config_description_masks_a_password_given_as_a_query_parameter() -> None:
    """libpq and redis-py both take the password as a URL query parameter
    (`?password=...`); `config check` must not print it (README: Configuration)."""
    config = Config.from_environ(
        {
            "SWITCHBOARD_DATABASE_URL": f"postgresql://app@db:5432/sb?password={DB_PASSWORD}",
            "SWITCHBOARD_REDIS_URL": f"redis://redis:6379/0?password={REDIS_PASSWORD}",
            "SWITCHBOARD_ENCRYPTION_KEYS": generate_key_spec("k1"),
        }
    )
    described = dict(config.describe())
    assert DB_PASSWORD not in described["SWITCHBOARD_DATABASE_URL"], described
    assert REDIS_PASSWORD not in described["SWITCHBOARD_REDIS_URL"], described


def test_config_check_command_prints_no_query_string_password(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "SWITCHBOARD_DATA_DIR": str(tmp_path),
        "SWITCHBOARD_DATABASE_URL": f"postgresql://app@db:5432/sb?password={DB_PASSWORD}",
        "SWITCHBOARD_REDIS_URL": f"redis://redis:6379/0?password={REDIS_PASSWORD}",
        "SWITCHBOARD_ENCRYPTION_KEYS": generate_key_spec("k1"),
    }
    done = switchboard("config", "check", env=env)
    printed = done.stdout + done.stderr
    assert "configuration OK" in printed or done.returncode == 0, printed
    assert DB_PASSWORD not in printed
    assert REDIS_PASSWORD not in printed


# ---- sends that end FAILED without reaching the metric -------------------------------


@pytest.fixture
def out_extra() -> dict[str, str]:
    # Retries far apart: the test moves the send clock itself.
    return {
        "SWITCHBOARD_SEND_RETRY_BASE_SECONDS": "60",
        "SWITCHBOARD_SEND_RETRY_MAX_SECONDS": "60",
        "SWITCHBOARD_SEND_MAX_ATTEMPTS": "3",
    }


@pytest.mark.parametrize("out_backend", ["embedded"], indirect=True)
async def test_a_message_that_ends_failed_is_counted_as_a_failed_send(out: Out) -> None:  # noqa: F811
    """A RETRYING message whose connection then needs a new login ends FAILED
    (CONNECTION_NEEDS_REAUTH): switchboard_outbound_sends_total{outcome="failed"} (what
    the SwitchboardSendsFailing alert divides) must see it."""
    await out.control.inject_error(2, account=out.ig_id)  # transient: RETRYING
    reply = await out.send(text="retry me later")
    await out.wait_status(reply.message.id, "MESSAGE_STATUS_RETRYING")
    failed_before = _sum("switchboard_outbound_sends_total", outcome="failed")
    await mark_needs_reauth(out.gateway.gateway.store, out.connection.id, "token revoked")
    out.advance(120)
    failed = await out.wait_status(reply.message.id, "MESSAGE_STATUS_FAILED")
    await asyncio.sleep(0.1)
    failed_after = _sum("switchboard_outbound_sends_total", outcome="failed")
    assert failed_after == failed_before + 1, (
        f"message FAILED ({failed.error.reason}) but sends_total{{outcome=failed}} "
        f"went {failed_before} -> {failed_after}"
    )


# ---- Meta API latency by endpoint -----------------------------------------------------


@pytest.mark.parametrize("out_backend", ["embedded"], indirect=True)
async def test_meta_calls_other_than_send_are_timed_by_endpoint(out: Out) -> None:  # noqa: F811
    """The fixture's customer wrote, so the gateway looked their profile up on Meta's
    Graph API (switchboard_profile_fetches_total{outcome="ok"}): that call is Meta API
    latency too, and switchboard_channel_api_seconds is "by endpoint"."""
    for _ in range(100):
        if _sum("switchboard_profile_fetches_total", outcome="ok") > 0:
            break
        await asyncio.sleep(0.05)
    assert _sum("switchboard_profile_fetches_total", outcome="ok") > 0
    reply = await out.send(text="hello")
    await out.wait_status(reply.message.id, "MESSAGE_STATUS_SENT")
    endpoints = {
        labels["endpoint"] for labels, _ in _samples("switchboard_channel_api_seconds_count")
    }
    assert "send" in endpoints
    assert endpoints - {"send"}, f"only these endpoints are ever timed: {sorted(endpoints)}"


# ---- grpc-prometheus message counters -------------------------------------------------


@pytest.mark.parametrize("out_backend", ["embedded"], indirect=True)
async def test_grpc_message_counters_count_like_grpc_prometheus(out: Out) -> None:  # noqa: F811
    """gateway/observability/metrics.py promises grpc-prometheus's names and semantics: a
    unary call counts one message received, and one sent when it succeeds."""
    labels = {"grpc_service": "switchboard.v1.Messaging", "grpc_method": "SendMessage"}
    reply = await out.send(text="count me")
    await out.wait_status(reply.message.id, "MESSAGE_STATUS_SENT")
    assert _sum("grpc_server_handled_total", **labels) >= 1
    received = _sum("grpc_server_msg_received_total", **labels)
    sent = _sum("grpc_server_msg_sent_total", **labels)
    assert sent >= 1, f"msg_received={received} msg_sent={sent}"
    assert received >= 1, f"msg_received={received} msg_sent={sent}"


@pytest.mark.parametrize("out_backend", ["embedded"], indirect=True)
async def test_fail_fast_send_throttled_by_meta_counts_one_failed_send(out: Out) -> None:  # noqa: F811
    """A fail_fast send that Meta throttles ends FAILED and is counted once, with Meta's
    code."""
    await out.throttle()
    before = _sum("switchboard_outbound_sends_total", outcome="failed")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await out.send(text="now or never", fail_fast=True)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await asyncio.sleep(0.1)
    after = _sum("switchboard_outbound_sends_total", outcome="failed")
    by_code = {
        labels["code"]: value
        for labels, value in _samples("switchboard_outbound_sends_total", outcome="failed")
    }
    assert after == before + 1, f"one FAILED message counted {after - before} times: {by_code}"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql:///sb?host=/run/postgresql&password=s3cret",
            "postgresql:///sb?host=",
        ),
        ("unix:///run/redis.sock?password=s3cret&db=0", "unix:///run/redis.sock?"),
    ],
    ids=["postgres-socket", "redis-socket"],
)
def test_config_description_keeps_a_socket_url_readable_when_masking_its_query_password(
    url: str, shown: str
) -> None:
    """A URL without a host (a Unix socket, libpq's and redis-py's documented forms) is
    shown as configured, its query password masked."""
    key = "SWITCHBOARD_REDIS_URL" if url.startswith("unix") else "SWITCHBOARD_DATABASE_URL"
    config = Config.from_environ({key: url, "SWITCHBOARD_ENCRYPTION_KEYS": generate_key_spec("k1")})
    described = dict(config.describe())[key]
    assert "s3cret" not in described
    assert described.startswith(shown), described
