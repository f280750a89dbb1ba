"""Without Meta credentials the channel runs against a sandbox inside the gateway."""

from __future__ import annotations

import grpc.aio
from switchboard.v1 import connect_pb2, connect_pb2_grpc

from channels.instagram import InstagramChannel
from channels.instagram.sandbox import SandboxClient
from tests.gateway_harness import RunningGateway
from tests.helpers import bearer


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
