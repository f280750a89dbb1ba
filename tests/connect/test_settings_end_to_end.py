"""Instagram settings a deployment gives as variables, end to end: a sandbox URL alone (the
gateway takes the credentials the sandbox generated, so pointing every process at one
`switchboard sandbox` is the whole setup), and extra Facebook Login permissions."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import grpc.aio
from switchboard.v1 import connect_pb2_grpc

from channels.instagram.sandbox import (
    SandboxClient,
    SandboxSettings,
    sandbox_base_urls,
    start_sandbox,
)
from gateway.app import Role
from tests.connect.conftest import Api, Browser
from tests.gateway_harness import gateway_environ, run_gateway
from tests.helpers import free_port


async def test_split_processes_share_one_sandbox_given_by_its_url_alone(tmp_path: Path) -> None:
    port = free_port()
    environ = gateway_environ(
        f"sqlite:///{tmp_path}/sb.db",
        str(tmp_path),
        SWITCHBOARD_HTTP_ADDR=f"127.0.0.1:{port}",
        SWITCHBOARD_PUBLIC_URL=f"http://127.0.0.1:{port}",
    )
    async with await start_sandbox(SandboxSettings.generate()) as sandbox:
        environ["INSTAGRAM_SANDBOX_URL"] = sandbox.url
        async with (
            SandboxClient(sandbox.url) as control,
            run_gateway(environ, Role.HTTP),
            run_gateway(environ, Role.GRPC) as grpc_side,
            grpc.aio.insecure_channel(grpc_side.grpc_target) as channel,
            aiohttp.ClientSession() as session,
        ):
            config = await control.config()
            assert config["webhook_url"] == f"http://127.0.0.1:{port}/webhooks/instagram"
            plugin = grpc_side.gateway.channels["instagram"]
            settings = plugin.settings  # type: ignore[attr-defined]
            assert settings.instagram_app_id == sandbox.settings.instagram_app_id
            assert settings.base_urls == {**settings.base_urls, **sandbox_base_urls(sandbox.url)}

            # The gRPC process starts the flow; the sidecar process exchanges the code with
            # the same sandbox, and the customer's messages reach it signed with its secret.
            api = Api(connect_pb2_grpc.ChannelConnectStub(channel), grpc_side.token)
            started = await api.start("acme", "instagram", return_url="")
            landing = await Browser(session).connect(started.authorization_url)
            assert landing.status == 200, landing.text
            (conn,) = await api.list("acme")
            sent = await control.send_dm(conn.account.external_id, "hello")
            assert sent["status"] == 200


async def test_facebook_login_asks_for_the_extra_permissions_configured(
    tmp_path: Path,
) -> None:
    port = free_port()
    async with await start_sandbox(SandboxSettings.generate()) as sandbox:
        environ = gateway_environ(
            f"sqlite:///{tmp_path}/sb.db",
            str(tmp_path),
            **sandbox.settings.credentials(),
            SWITCHBOARD_HTTP_ADDR=f"127.0.0.1:{port}",
            SWITCHBOARD_PUBLIC_URL=f"http://127.0.0.1:{port}",
            INSTAGRAM_SANDBOX_URL=sandbox.url,
            FACEBOOK_LOGIN_EXTRA_SCOPES="business_management",
        )
        async with (
            run_gateway(environ) as gw,
            grpc.aio.insecure_channel(gw.grpc_target) as channel,
            aiohttp.ClientSession() as session,
        ):
            api = Api(connect_pb2_grpc.ChannelConnectStub(channel), gw.token)
            started = await api.start("acme", "facebook", return_url="")
            scope = parse_qs(urlsplit(started.authorization_url).query)["scope"][0]
            assert scope.split(",")[-1] == "business_management"
            landing = await Browser(session).connect(started.authorization_url)
            assert landing.status == 200, landing.text
            (conn,) = await api.list("acme")
            assert "business_management" in conn.scopes
