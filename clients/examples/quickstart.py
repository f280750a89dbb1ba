"""The mission end to end against ``make run``, one step at a time, printing each:

    python -m clients.examples.quickstart            # in a second terminal, from the repo root

1. A tenant connects Instagram: ``StartConnect``, then the browser's trip through the
   authorization URL (the built-in sandbox approves at once) back to the sidecar.
2. The AI backend subscribes to the tenant's events.
3. A customer writes to the business: the sandbox's control API plays the customer and
   delivers Meta's signed webhook to the gateway.
4. The backend receives ``MessageReceived`` and answers with ``SendMessage``.
5. History shows both messages, and the sandbox shows what reached Meta's Send API.

Each run uses a new tenant, so its consumer group starts with nothing but this run's events.
The sandbox's address is the authorization URL's: the sandbox serves Meta's login pages.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from switchboard.v1 import common_pb2, connect_pb2, events_pb2, messaging_pb2

from clients.client import SwitchboardClient
from gateway.config import DEV_TOKEN_FILE_NAME, data_dir_from, grpc_target_from

CUSTOMER_TEXT = "Hi, are you open today?"
ANSWER_TEXT = "Yes, from 9 to 6. See you soon!"


@dataclass(frozen=True)
class Outcome:
    connection_id: str
    conversation_id: str
    received: str
    answered: common_pb2.Message
    history: list[str]
    sent_to_meta: int


async def run(
    target: str, token: str, *, tenant: str, timeout_s: float = 20.0, say: bool = True
) -> Outcome:
    def step(text: str) -> None:
        if say:
            print(text, flush=True)

    async with SwitchboardClient(target, token) as sb, aiohttp.ClientSession() as http:
        started = await sb.connect.StartConnect(
            connect_pb2.StartConnectRequest(tenant_id=tenant, channel="instagram")
        )
        step(f"1. StartConnect for tenant {tenant}: the browser goes to the authorization URL")
        async with http.get(started.authorization_url) as landing:
            page = await landing.text()
            if landing.status != 200:
                raise SystemExit(f"the connect flow ended with HTTP {landing.status}: {page}")
        connections = await sb.connect.ListConnections(
            connect_pb2.ListConnectionsRequest(tenant_id=tenant)
        )
        conn = connections.connections[0]
        step(
            f"   connected: {conn.id} (@{conn.account.username}, account"
            f" {conn.account.external_id}), {common_pb2.ConnectionStatus.Name(conn.status)}"
        )

        sandbox = "{0.scheme}://{0.netloc}".format(urlsplit(started.authorization_url))
        received, reply = await asyncio.wait_for(
            _converse(sb, http, sandbox, conn, tenant, step), timeout_s
        )
        messages = await sb.messaging.ListMessages(
            messaging_pb2.ListMessagesRequest(conversation_id=reply.message.conversation_id)
        )
        history = [f"{common_pb2.Direction.Name(m.direction)}: {m.text}" for m in messages.messages]
        step("5. ListMessages, newest first:")
        for line in history:
            step(f"   {line}")
        async with http.get(
            f"{sandbox}/_sandbox/sent", params={"account": conn.account.external_id}
        ) as sent:
            calls = (await sent.json())["data"]
        step(f"   the sandbox's Send API was called {len(calls)} time(s) for this account")
        return Outcome(
            connection_id=conn.id,
            conversation_id=reply.message.conversation_id,
            received=received,
            answered=reply.message,
            history=history,
            sent_to_meta=len(calls),
        )


async def _converse(
    sb: SwitchboardClient,
    http: aiohttp.ClientSession,
    sandbox: str,
    conn: common_pb2.Connection,
    tenant: str,
    say: Callable[[str], None],
) -> tuple[str, messaging_pb2.SendMessageResponse]:
    acks: asyncio.Queue[messaging_pb2.SubscribeRequest] = asyncio.Queue()

    async def requests() -> AsyncIterator[messaging_pb2.SubscribeRequest]:
        yield messaging_pb2.SubscribeRequest(
            start=messaging_pb2.SubscribeStart(
                group="quickstart",
                consumer="quickstart-1",
                tenant_ids=[tenant],
                kinds=[events_pb2.EVENT_KIND_MESSAGE_RECEIVED],
            )
        )
        while True:
            yield await acks.get()

    stream = sb.messaging.Subscribe(requests())
    try:
        say("2. Subscribe: the AI backend listens to the tenant's MessageReceived events")
        async with http.post(
            f"{sandbox}/_sandbox/events/message",
            json={"account": conn.account.external_id, "text": CUSTOMER_TEXT},
        ) as sent:
            customer = (await sent.json())["customer"]
        say(f"3. customer {customer} writes: {CUSTOMER_TEXT!r} (a signed webhook to the gateway)")
        while True:
            response = await stream.read()
            if not isinstance(response, messaging_pb2.SubscribeResponse):
                raise SystemExit("the Subscribe stream ended")
            for delivery in response.deliveries:
                await acks.put(
                    messaging_pb2.SubscribeRequest(
                        ack=messaging_pb2.Ack(delivery_ids=[delivery.delivery_id])
                    )
                )
                event = delivery.event
                received = event.message_received
                say(
                    f"4. received {event.event_id}: {received.message.text!r} from"
                    f" {received.sender.channel_user_id}, window open until"
                    f" {received.window_expires_at.ToDatetime():%Y-%m-%d %H:%M} UTC"
                )
                reply = await sb.messaging.SendMessage(
                    messaging_pb2.SendMessageRequest(
                        tenant_id=event.tenant_id,
                        connection_id=event.connection_id,
                        conversation_id=event.conversation_id,
                        text=ANSWER_TEXT,
                        idempotency_key=f"quickstart:{event.event_id}",
                    )
                )
                status = common_pb2.MessageStatus.Name(reply.message.status)
                say(f"   SendMessage {reply.message.id}: {status}")
                return received.message.text, reply
    finally:
        stream.cancel()


def default_token_file(environ: Mapping[str, str]) -> str:
    """Where `make run` (`serve --dev`) writes the dev token: the gateway's own rule, so that
    the example finds it whatever SWITCHBOARD_DATA_DIR says."""
    return os.path.join(data_dir_from(environ), DEV_TOKEN_FILE_NAME)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--target",
        default=grpc_target_from(os.environ),
        help="the gateway's gRPC address (default: %(default)s, from SWITCHBOARD_GRPC_ADDR)",
    )
    parser.add_argument(
        "--token-file",
        default=default_token_file(os.environ),
        help="where make run keeps the dev token (default: %(default)s, in SWITCHBOARD_DATA_DIR)",
    )
    args = parser.parse_args()
    token_file = Path(args.token_file)
    if not token_file.exists():
        raise SystemExit(f"{token_file} not found: start the gateway with `make run` first")
    tenant = f"quickstart-{secrets.token_hex(3)}"
    asyncio.run(run(args.target, token_file.read_text().strip(), tenant=tenant))


if __name__ == "__main__":
    main()
