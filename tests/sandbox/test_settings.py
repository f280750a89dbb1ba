"""Settings, the config endpoint, base URLs, and running the sandbox as a process."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import aiohttp
import pytest

from channels.instagram.sandbox import (
    SandboxClient,
    SandboxSettings,
    SandboxSettingsError,
    sandbox_base_urls,
    start_sandbox,
)
from tests.helpers import free_port


def test_without_credentials_both_apps_are_generated() -> None:
    settings = SandboxSettings.from_environ({})
    assert settings.instagram_generated
    assert settings.facebook_generated
    assert settings.verify_token_generated
    assert settings.instagram_app_id.isdigit()
    assert settings.instagram_app_id != settings.facebook_app_id
    assert settings.instagram_app_secret not in repr(settings)
    assert settings.credentials()["INSTAGRAM_APP_SECRET"] == settings.instagram_app_secret


def test_configured_credentials_are_used_and_a_half_pair_is_an_error() -> None:
    settings = SandboxSettings.from_environ(
        {
            "INSTAGRAM_APP_ID": "111",
            "INSTAGRAM_APP_SECRET": "ig-secret",
            "INSTAGRAM_WEBHOOK_VERIFY_TOKEN": "vt",
            "INSTAGRAM_SANDBOX_LATENCY_MS": "50",
        }
    )
    assert (settings.instagram_app_id, settings.instagram_app_secret) == ("111", "ig-secret")
    assert not settings.instagram_generated
    assert settings.facebook_generated
    assert settings.webhook_verify_token == "vt"
    assert settings.latency_ms == 50
    with pytest.raises(SandboxSettingsError, match="FACEBOOK_APP_SECRET"):
        SandboxSettings.from_environ({"FACEBOOK_APP_ID": "1"})
    with pytest.raises(SandboxSettingsError, match="INSTAGRAM_SANDBOX_LATENCY_MS"):
        SandboxSettings.from_environ({"INSTAGRAM_SANDBOX_LATENCY_MS": "fast"})


def test_base_urls_give_every_meta_host_its_own_prefix() -> None:
    assert sandbox_base_urls("http://127.0.0.1:8099/") == {
        "INSTAGRAM_FACEBOOK_WWW_URL": "http://127.0.0.1:8099/facebook-www",
        "INSTAGRAM_GRAPH_FACEBOOK_URL": "http://127.0.0.1:8099/graph-facebook",
        "INSTAGRAM_WWW_URL": "http://127.0.0.1:8099/instagram-www",
        "INSTAGRAM_API_URL": "http://127.0.0.1:8099/api-instagram",
        "INSTAGRAM_GRAPH_URL": "http://127.0.0.1:8099/graph-instagram",
    }


async def test_config_shows_generated_secrets_but_never_configured_ones() -> None:
    settings = SandboxSettings.from_environ(
        {"FACEBOOK_APP_ID": "222", "FACEBOOK_APP_SECRET": "real-secret"}
    )
    async with await start_sandbox(settings) as sandbox, SandboxClient(sandbox.url) as control:
        config = await control.config()
    assert config["facebook_app_id"] == "222"
    assert config["facebook_app_secret"] is None
    assert config["instagram_app_secret"] == settings.instagram_app_secret
    assert config["webhook_verify_token"] == settings.webhook_verify_token
    assert config["generated"] == {
        "instagram": True,
        "facebook": False,
        "webhook_verify_token": True,
    }
    assert config["base_urls"] == sandbox_base_urls(sandbox.url)


async def test_two_sandboxes_in_one_process_share_nothing() -> None:
    async with await start_sandbox() as one, await start_sandbox() as two:
        one.state.create_account()
        assert len(one.state.accounts) == 1
        assert two.state.accounts == {}
        assert one.settings.instagram_app_secret != two.settings.instagram_app_secret


async def test_run_sandbox_serves_until_sigterm_and_exits_cleanly() -> None:
    port = free_port()
    code = (
        "import sys; from channels.instagram.sandbox import run_sandbox;"
        f" run_sandbox('127.0.0.1:{port}', {{}})"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INSTAGRAM_", "FACEBOOK_"))}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, env=env, cwd=os.getcwd()
    )
    try:
        config = None
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                try:
                    async with http.get(f"http://127.0.0.1:{port}/_sandbox/config") as response:
                        config = await response.json()
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
        assert config is not None
        assert config["generated"]["instagram"] is True
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
