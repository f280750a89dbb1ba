"""An example AI backend: answers every customer message, exactly once.

    python -m clients.examples.echo_bot 127.0.0.1:50051 "$(cat var/dev-token)" --tenant acme

It subscribes as consumer group ``echo-bot`` (``--group``), and for each ``MessageReceived``
sends a reply to the same conversation, then acks the delivery. The reply's idempotency key
is derived from the event id, which stays the same across redeliveries: when the bot dies
between sending and acking, the redelivered event produces the same key and no second reply.

A refused reply (too long, the customer's messaging window closed, ...) is refused again on
every redelivery, so it is logged and acked: left unacked it would come back forever and
hold up the conversation's later messages. A transient failure is nacked with a growing
delay and retried, up to ``MAX_ATTEMPTS``. Replace :func:`answer` with a call to your model.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from switchboard.v1 import common_pb2, events_pb2, messaging_pb2

from clients.client import SwitchboardClient

log = logging.getLogger("echo_bot")

# Codes that the same request gets again however often it is retried. RESOURCE_EXHAUSTED
# only comes with fail_fast, which records the message as failed under its idempotency key.
REFUSED = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
# A failure that outlasts this many deliveries is no longer transient for this event.
MAX_ATTEMPTS = 10
# A hung call must not stall the stream: past this, DEADLINE_EXCEEDED and a retry.
SEND_TIMEOUT_S = 30.0
# How long a stop waits for the server to take the last acks and close the stream.
CLOSE_TIMEOUT_S = 5.0


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
    # Acks and nacks to send; None ends the requests, which asks the server to close.
    outgoing: asyncio.Queue[messaging_pb2.SubscribeRequest | None] = asyncio.Queue()
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
        while (request := await outgoing.get()) is not None:
            yield request

    stream = client.messaging.Subscribe(requests())
    stopping = asyncio.create_task(stop.wait())
    read: asyncio.Future[Any] | None = None
    try:
        while True:
            read = read or asyncio.ensure_future(stream.read())
            await asyncio.wait({read, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not read.done():
                break  # asked to stop, with this read still pending
            response, read = read.result(), None
            if not isinstance(response, messaging_pb2.SubscribeResponse):
                return  # the server ended the stream
            for delivery in response.deliveries:
                await outgoing.put(await _handle(client, delivery, reply))
        # A clean stop: the acks still queued go out, then the end of the requests, and the
        # server closes the stream once it has applied them. (Cancelling at once could lose
        # the last acks, and their events would come back to whoever runs next.) What
        # arrives meanwhile is left unacked, for redelivery.
        await outgoing.put(None)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                while read is not None and isinstance(await read, messaging_pb2.SubscribeResponse):
                    read = asyncio.ensure_future(stream.read())
    finally:
        stopping.cancel()
        stream.cancel()


async def _handle(
    client: SwitchboardClient, delivery: messaging_pb2.Delivery, reply: Callable[[str], str]
) -> messaging_pb2.SubscribeRequest:
    """Answers one delivery; returns its ack, or its nack when a retry may succeed."""
    event = delivery.event
    where = f"event_id={event.event_id} attempt={delivery.attempt}"
    try:
        sent = await client.messaging.SendMessage(
            messaging_pb2.SendMessageRequest(
                tenant_id=event.tenant_id,
                connection_id=event.connection_id,
                conversation_id=event.conversation_id,
                text=reply(event.message_received.message.text),
                idempotency_key=f"echo-bot:{event.event_id}",
            ),
            timeout=SEND_TIMEOUT_S,
        )
    except grpc.aio.AioRpcError as exc:
        code, reason = exc.code(), f"{_reason(exc)} ({exc.details()})"
        if code in REFUSED or delivery.attempt >= MAX_ATTEMPTS:
            log.error("not answered, acked: %s code=%s reason=%s", where, code.name, reason)
            return _ack(delivery)
        delay = min(2**delivery.attempt, 300)
        log.warning(
            "failed, nacked: %s code=%s reason=%s retry_in=%ds", where, code.name, reason, delay
        )
        nack = messaging_pb2.Nack(
            delivery_id=delivery.delivery_id, delay=duration_pb2.Duration(seconds=delay)
        )
        return messaging_pb2.SubscribeRequest(nack=nack)
    status = common_pb2.MessageStatus.Name(sent.message.status)
    log.info("answered, acked: %s message_id=%s status=%s", where, sent.message.id, status)
    return _ack(delivery)


def _ack(delivery: messaging_pb2.Delivery) -> messaging_pb2.SubscribeRequest:
    return messaging_pb2.SubscribeRequest(
        ack=messaging_pb2.Ack(delivery_ids=[delivery.delivery_id])
    )


def _reason(exc: grpc.aio.AioRpcError) -> str:
    """The machine-readable reason of the ErrorInfo detail Switchboard's errors carry."""
    status = rpc_status.from_call(exc)
    info = error_details_pb2.ErrorInfo()
    for detail in status.details if status else ():
        if detail.Unpack(info):
            return str(info.reason)
    return ""


async def main() -> None:
    parser = argparse.ArgumentParser(description="Answer every customer message.")
    parser.add_argument("target")
    parser.add_argument("token")
    parser.add_argument("--tenant", action="append", default=[], help="repeatable")
    parser.add_argument("--group", default="echo-bot", help="consumer group (default echo-bot)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    async with SwitchboardClient(args.target, args.token) as client:
        await run_bot(client, tenant_ids=args.tenant, group=args.group)


if __name__ == "__main__":
    asyncio.run(main())
