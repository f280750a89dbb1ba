"""A call to Meta that fails says whether Meta may have carried it out: only a failure to
connect proves it did not. Real sockets on loopback, no Meta."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from channels.instagram.graph_client import GraphClient
from channels.instagram.settings import InstagramSettings
from gateway.domain.errors import ChannelTransientError, ConfigError
from tests.helpers import free_port


@contextlib.asynccontextmanager
async def _client(url: str, timeout_s: float = 0.3) -> AsyncIterator[GraphClient]:
    client = GraphClient(lambda _host: url, timeout_s=timeout_s)
    await client.start()
    try:
        yield client
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def _server(on_request: str) -> AsyncIterator[str]:
    """A server that reads the request, then never answers or drops the connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if on_request == "drop":
            writer.transport.abort()
            return
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        # A handler still sleeping on its silent connection is not waited for.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 1)


async def test_a_refused_connection_was_not_delivered() -> None:
    # Nothing listens on a port free_port() just gave.
    async with _client(f"http://127.0.0.1:{free_port()}") as client:
        with pytest.raises(ChannelTransientError) as caught:
            await client.call("POST", "INSTAGRAM_GRAPH_URL", "/me/messages", json={"a": 1})
    assert not caught.value.maybe_delivered
    assert "could not be reached" in caught.value.message


@pytest.mark.parametrize("on_request", ["silence", "drop"])
async def test_a_request_that_got_no_answer_may_have_been_delivered(on_request: str) -> None:
    async with _server(on_request) as url, _client(url) as client:
        with pytest.raises(ChannelTransientError) as caught:
            await client.call("POST", "INSTAGRAM_GRAPH_URL", "/me/messages", json={"a": 1})
    assert caught.value.maybe_delivered
    assert "may have been carried out" in caught.value.message


def test_the_api_timeout_is_configurable_and_checked() -> None:
    public = "http://127.0.0.1:8080"
    assert InstagramSettings.from_environ({}, public).api_timeout_s == 15.0
    settings = InstagramSettings.from_environ({"INSTAGRAM_API_TIMEOUT_SECONDS": "2.5"}, public)
    assert settings.api_timeout_s == 2.5
    for wrong in ("soon", "0", "-1", "1000"):
        with pytest.raises(ConfigError, match="INSTAGRAM_API_TIMEOUT_SECONDS"):
            InstagramSettings.from_environ({"INSTAGRAM_API_TIMEOUT_SECONDS": wrong}, public)
