"""The example AI backend answers a customer through the real Subscribe and SendMessage."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from clients import SwitchboardClient
from clients.examples.echo_bot import answer, run_bot
from tests.outbound.conftest import Out


async def answered(out: Out, *wanted: str) -> list[str | None]:
    """The texts the account sent, once all of ``wanted`` are among them (or after 10 s)."""
    for _ in range(200):
        texts = [
            s["body"]["message"].get("text")
            for s in await out.control.sent(out.account["ig_id"])
            if "message" in s.get("body", {})
        ]
        if all(text in texts for text in wanted):
            break
        await asyncio.sleep(0.05)
    return texts


async def serve_until_answered(
    out: Out, *texts: str, reply: Callable[[str], str] = answer
) -> list[str | None]:
    """Runs a bot of group ``bot-test`` until it has answered every one of ``texts`` (the
    customers' messages of different conversations may be answered in any order), checking
    it stays alive."""
    stop = asyncio.Event()
    async with SwitchboardClient(out.gateway.grpc_target, out.gateway.token) as client:
        bot = asyncio.create_task(
            run_bot(
                client,
                tenant_ids=[out.connection.tenant_id],
                group="bot-test",
                reply=reply,
                stop=stop,
            )
        )
        try:
            sent = await answered(out, *(answer(text) for text in texts))
            assert not bot.done(), bot.exception()
            return sent
        finally:
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(bot, 10)


async def test_the_echo_bot_answers_each_customer_message_once(out: Out) -> None:
    await out.control.send_dm(out.account["ig_id"], "Do you ship to Lyon?")
    # The first message (written by the fixture) is answered too, each exactly once.
    texts = await serve_until_answered(out, "Hi", "Do you ship to Lyon?")
    assert texts.count("You said: Do you ship to Lyon?") == 1
    assert texts.count("You said: Hi") == 1


async def test_a_refused_reply_is_acked_and_the_bot_answers_the_next_message(out: Out) -> None:
    # "You said: " makes the reply 1005 bytes, over Instagram's 1000: INVALID_ARGUMENT.
    long = "x" * 995
    seen: list[str] = []

    def reply(text: str) -> str:
        seen.append(text)
        return answer(text)

    customer = (await out.control.send_dm(out.account["ig_id"], long))["customer"]
    await out.control.send_dm(out.account["ig_id"], "Do you ship to Lyon?", customer=customer)
    # One conversation: the second message is only delivered once the first is settled, so
    # this bot has handled the long one when it answers the second.
    texts = await serve_until_answered(out, "Hi", "Do you ship to Lyon?", reply=reply)
    assert answer(long) not in texts
    # A new bot of the group would get a delivery left unacked first, in conversation order.
    await out.control.send_dm(out.account["ig_id"], "Still there?", customer=customer)
    texts = await serve_until_answered(out, "Still there?", reply=reply)
    assert seen.count(long) == 1
    for text in ("Hi", "Do you ship to Lyon?", "Still there?"):
        assert texts.count(answer(text)) == 1, text
