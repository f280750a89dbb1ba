"""``switchboard keys rotate``: every credential re-encrypted with the ring's first key."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from channels.instagram.sandbox import RunningSandbox
from gateway.security.keyring import KeyRing, generate_key_spec
from gateway.services.credentials import unseal
from gateway.store import open_store
from tests.connect.conftest import Api, Browser, connect_account
from tests.gateway_harness import RunningGateway
from tests.helpers import switchboard


async def rotate(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The command, run off the event loop: the gateway under test shares this loop, and a
    transaction it has open must go on to its commit while the command waits for the lock."""
    return await asyncio.to_thread(switchboard, "keys", "rotate", env=env)


@pytest.fixture
async def connected(
    gw: RunningGateway, api: Api, browser: Browser
) -> tuple[RunningGateway, list[str]]:
    ids = [
        (await connect_account(api, browser, "acme", flow)).id
        for flow in ("instagram", "facebook", "instagram")
    ]
    return gw, ids


async def test_keys_rotate_reencrypts_every_credential_and_reports_counts(
    connected: tuple[RunningGateway, list[str]], sandbox: RunningSandbox, tmp_path: Path
) -> None:
    gw, ids = connected
    old_spec = gw.gateway.config.encryption_keys.reveal()
    new_spec = generate_key_spec("k2")
    env = {
        "SWITCHBOARD_DATABASE_URL": gw.gateway.config.database_url.reveal(),
        "SWITCHBOARD_DATA_DIR": str(tmp_path),
        "SWITCHBOARD_ENCRYPTION_KEYS": f"{new_spec},{old_spec}",
        "SWITCHBOARD_LOG_FORMAT": "json",
    }

    first = await rotate(env)
    second = await rotate(env)

    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == (
        "credentials: 3; re-encrypted with key k2: 3; already current: 0; failed: 0"
    )
    assert "already current: 3" in second.stdout
    only_new = KeyRing.from_spec(new_spec)
    async with (
        open_store(env["SWITCHBOARD_DATABASE_URL"]) as store,
        store.transaction() as tx,
    ):
        credentials = [await tx.get_credential(i) for i in ids]
    for credential in credentials:
        assert credential is not None
        assert credential.key_id == "k2"
        assert unseal(only_new, credential).value.reveal() in sandbox.state.tokens


async def test_keys_rotate_counts_credentials_no_key_opens(
    connected: tuple[RunningGateway, list[str]], tmp_path: Path
) -> None:
    gw, _ = connected
    env = {
        "SWITCHBOARD_DATABASE_URL": gw.gateway.config.database_url.reveal(),
        "SWITCHBOARD_DATA_DIR": str(tmp_path),
        "SWITCHBOARD_ENCRYPTION_KEYS": generate_key_spec("k3"),
        "SWITCHBOARD_LOG_FORMAT": "json",
    }
    result = await rotate(env)
    assert result.returncode == 1
    assert "failed: 3" in result.stdout
