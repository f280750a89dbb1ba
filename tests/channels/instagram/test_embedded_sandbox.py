"""Without Meta credentials the channel runs against a sandbox inside the gateway."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import aiohttp
import grpc.aio
from switchboard.v1 import connect_pb2, connect_pb2_grpc

from channels.instagram import InstagramChannel
from channels.instagram.sandbox import SandboxClient
from tests.gateway_harness import RunningGateway, gateway_environ, run_gateway
from tests.helpers import bearer, switchboard


async def test_no_credentials_starts_the_sandbox_in_process(embedded: RunningGateway) -> None:
    plugin = embedded.gateway.channels["instagram"]
    assert isinstance(plugin, InstagramChannel)
    assert plugin.embedded_sandbox
    settings = plugin.settings
    assert settings.instagram_flow_configured
    assert settings.facebook_flow_configured
    assert all(url.startswith(plugin.sandbox_url) for url in settings.base_urls.values())
    async with SandboxClient(plugin.sandbox_url) as sandbox:
        config = await sandbox.config()
    assert config["instagram_app_id"] == settings.instagram_app_id


async def test_list_channels_says_the_channel_runs_on_the_sandbox(
    embedded: RunningGateway, channel: grpc.aio.Channel
) -> None:
    stub = connect_pb2_grpc.ChannelConnectStub(channel)
    reply = await stub.ListChannels(
        connect_pb2.ListChannelsRequest(), metadata=bearer(embedded.token)
    )
    (instagram,) = reply.channels
    assert instagram.sandbox
    assert instagram.configured


async def test_outside_the_embedded_default_no_credentials_start_no_sandbox(
    postgres_url: str, tmp_path: Path
) -> None:
    """On PostgreSQL (a deployment that forgot its Meta secrets) the channel is not
    configured: no stand-in whose control API would hand out its secrets, and webhooks,
    which no secret can sign, are refused."""
    env = gateway_environ(postgres_url, str(tmp_path))
    async with run_gateway(env) as running:
        plugin = running.gateway.channels["instagram"]
        assert isinstance(plugin, InstagramChannel)
        assert not plugin.embedded_sandbox
        assert plugin.sandbox_url == ""
        info = plugin.info()
        assert not info.configured
        assert not info.sandbox
        body = b'{"object":"instagram","entry":[]}'
        signature = "sha256=" + hmac.new(b"", body, hashlib.sha256).hexdigest()
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                running.http_url + "/webhooks/instagram",
                data=body,
                headers={"X-Hub-Signature-256": signature},
            ) as reply,
        ):
            assert reply.status == 403
    result = switchboard("config", "check", env={**env, "SWITCHBOARD_DATABASE_URL": postgres_url})
    assert result.returncode == 0, result.stderr
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("channel instagram")]
    assert line.split(None, 2)[2].startswith("not configured;")
