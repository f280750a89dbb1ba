"""The example AI backend answers a customer through the real Subscribe and SendMessage."""

from __future__ import annotations

import asyncio
import contextlib

from clients import SwitchboardClient
from clients.examples.echo_bot import run_bot
from tests.outbound.conftest import Out


async def test_the_echo_bot_answers_each_customer_message_once(out: Out) -> None:
    stop = asyncio.Event()
    async with SwitchboardClient(out.gateway.grpc_target, out.gateway.token) as client:
        bot = asyncio.create_task(
            run_bot(client, tenant_ids=[out.connection.tenant_id], group="bot-test", stop=stop)
        )
        try:
            await out.control.send_dm(out.account["ig_id"], "Do you ship to Lyon?")
            for _ in range(200):
                texts = [
                    s["body"]["message"].get("text")
                    for s in await out.control.sent(out.account["ig_id"])
                    if "message" in s.get("body", {})
                ]
                if "You said: Do you ship to Lyon?" in texts:
                    break
                await asyncio.sleep(0.05)
            # The first message (written by the fixture) is answered too, each exactly once.
            assert texts.count("You said: Do you ship to Lyon?") == 1
            assert texts.count("You said: Hi") == 1
        finally:
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(bot, 10)
