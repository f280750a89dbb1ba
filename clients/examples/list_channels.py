"""Lists the installed channels: ``python -m clients.examples.list_channels TARGET TOKEN``."""

from __future__ import annotations

import asyncio
import sys

from switchboard.v1 import connect_pb2

from clients.client import SwitchboardClient


async def main(target: str, token: str) -> None:
    async with SwitchboardClient(target, token) as sb:
        reply = await sb.connect.ListChannels(connect_pb2.ListChannelsRequest())
        for channel in reply.channels:
            flows = ", ".join(f.name for f in channel.login_flows)
            print(f"{channel.name}: sandbox={channel.sandbox} login flows: {flows}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m clients.examples.list_channels TARGET TOKEN")
    asyncio.run(main(sys.argv[1], sys.argv[2]))
