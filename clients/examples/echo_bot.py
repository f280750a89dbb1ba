"""An example AI backend: answers every customer message, exactly once.

    python -m clients.examples.echo_bot 127.0.0.1:50051 "$(cat var/dev-token)" --tenant acme

It subscribes as consumer group ``echo-bot``, and for each ``MessageReceived`` sends a reply
to the same conversation, then acks the delivery. The reply's idempotency key is derived
from the event id, which stays the same across redeliveries: when the bot dies between
sending and acking, the redelivered event produces the same key and no second reply.
Replace :func:`answer` with a call to your model.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from switchboard.v1 import events_pb2, messaging_pb2

from clients.client import SwitchboardClient

log = logging.getLogger("echo_bot")


def answer(text: str) -> str:
    return f"You said: {text}" if text else "Thanks for your message!"


async def run_bot(
    client: SwitchboardClient,
    *,
    tenant_ids: list[str],
    group: str = "echo-bot",
    consumer: str = "echo-bot-1",
    reply: Callable[[str], str] = answer,
    stop: asyncio.Event | None = None,
) -> None:
    """Serves until ``stop`` is set (or forever)."""
    outgoing: asyncio.Queue[messaging_pb2.SubscribeRequest] = asyncio.Queue()
    stop = stop or asyncio.Event()

    async def requests() -> AsyncIterator[messaging_pb2.SubscribeRequest]:
        yield messaging_pb2.SubscribeRequest(
            start=messaging_pb2.SubscribeStart(
                group=group,
                consumer=consumer,
                tenant_ids=tenant_ids,
                kinds=[events_pb2.EVENT_KIND_MESSAGE_RECEIVED],
                max_in_flight=32,
                max_batch=16,
            )
        )
        while True:
            yield await outgoing.get()

    stream = client.messaging.Subscribe(requests())
    stopping = asyncio.create_task(stop.wait())
    try:
        while not stop.is_set():
            read = asyncio.ensure_future(stream.read())
            await asyncio.wait({read, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not read.done():
                read.cancel()
                break
            response = read.result()
            if not isinstance(response, messaging_pb2.SubscribeResponse):
                break  # the server ended the stream
            for delivery in response.deliveries:
                await _handle(client, delivery, reply)
                ack = messaging_pb2.Ack(delivery_ids=[delivery.delivery_id])
                await outgoing.put(messaging_pb2.SubscribeRequest(ack=ack))
    finally:
        stopping.cancel()
        stream.cancel()


async def _handle(
    client: SwitchboardClient, delivery: messaging_pb2.Delivery, reply: Callable[[str], str]
) -> None:
    event = delivery.event
    received = event.message_received
    await client.messaging.SendMessage(
        messaging_pb2.SendMessageRequest(
            tenant_id=event.tenant_id,
            connection_id=event.connection_id,
            conversation_id=event.conversation_id,
            text=reply(received.message.text),
            idempotency_key=f"echo-bot:{event.event_id}",
        )
    )
    log.info("answered", extra={"event_id": event.event_id, "attempt": delivery.attempt})


async def main() -> None:
    parser = argparse.ArgumentParser(description="Answer every customer message.")
    parser.add_argument("target")
    parser.add_argument("token")
    parser.add_argument("--tenant", action="append", default=[], help="repeatable")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    async with SwitchboardClient(args.target, args.token) as client:
        await run_bot(client, tenant_ids=args.tenant)


if __name__ == "__main__":
    asyncio.run(main())
