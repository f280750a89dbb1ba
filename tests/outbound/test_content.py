"""Each kind of content reaches Meta's Send API as the exact body Meta documents."""

from __future__ import annotations

from typing import Any

import pytest
from switchboard.v1 import common_pb2, messaging_pb2

from tests.gateway_harness import store_connection
from tests.outbound.conftest import Out, customer_writes

HTTPS = "https://cdn.example/media"

CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("text", {"text": "Hello 👋"}, {"message": {"text": "Hello 👋"}}),
    (
        "quick_replies",
        {
            "text": "Pick one",
            "quick_replies": [
                messaging_pb2.QuickReply(title="Red", payload="R"),
                messaging_pb2.QuickReply(title="Blue", payload="B"),
            ],
        },
        {
            "message": {
                "text": "Pick one",
                "quick_replies": [
                    {"content_type": "text", "title": "Red", "payload": "R"},
                    {"content_type": "text", "title": "Blue", "payload": "B"},
                ],
            }
        },
    ),
    *[
        (
            f"attachment_{kind}",
            {
                "attachment": messaging_pb2.OutboundAttachment(
                    type=getattr(common_pb2, f"ATTACHMENT_TYPE_{kind.upper()}"),
                    url=f"{HTTPS}.{kind}",
                )
            },
            {"message": {"attachment": {"type": kind, "payload": {"url": f"{HTTPS}.{kind}"}}}},
        )
        for kind in ("image", "video", "audio", "file")
    ],
    (
        "heart_sticker",
        {"sticker": messaging_pb2.Sticker(kind=messaging_pb2.Sticker.KIND_LIKE_HEART)},
        {"message": {"attachment": {"type": "like_heart"}}},
    ),
    (
        "share",
        {"share": messaging_pb2.Share(post_id="17900000000000001")},
        {
            "message": {
                "attachment": {"type": "MEDIA_SHARE", "payload": {"id": "17900000000000001"}}
            }
        },
    ),
    (
        "generic_template",
        {
            "template": messaging_pb2.Template(
                elements=[
                    messaging_pb2.TemplateElement(
                        title="Boots",
                        subtitle="Size 42",
                        image_url=f"{HTTPS}/boots.png",
                        default_action=messaging_pb2.TemplateAction(url="https://shop.example/b"),
                        buttons=[
                            messaging_pb2.TemplateButton(
                                type=messaging_pb2.TemplateButton.TYPE_WEB_URL,
                                title="Buy",
                                url="https://shop.example/buy",
                            ),
                            messaging_pb2.TemplateButton(
                                type=messaging_pb2.TemplateButton.TYPE_POSTBACK,
                                title="Later",
                                payload="LATER",
                            ),
                        ],
                    )
                ]
            )
        },
        {
            "message": {
                "attachment": {
                    "type": "template",
                    "payload": {
                        "template_type": "generic",
                        "elements": [
                            {
                                "title": "Boots",
                                "subtitle": "Size 42",
                                "image_url": f"{HTTPS}/boots.png",
                                "default_action": {
                                    "type": "web_url",
                                    "url": "https://shop.example/b",
                                },
                                "buttons": [
                                    {
                                        "type": "web_url",
                                        "url": "https://shop.example/buy",
                                        "title": "Buy",
                                    },
                                    {"type": "postback", "title": "Later", "payload": "LATER"},
                                ],
                            }
                        ],
                    },
                }
            }
        },
    ),
    *[
        (
            f"sender_action_{action}",
            {
                "sender_action": messaging_pb2.SenderAction(
                    action=getattr(messaging_pb2.SenderAction, f"ACTION_{action.upper()}")
                )
            },
            {"sender_action": action},
        )
        for action in ("typing_on", "typing_off", "mark_seen")
    ],
]


@pytest.mark.parametrize(("name", "fields", "expected"), CASES, ids=[c[0] for c in CASES])
async def test_each_content_kind_is_sent_as_metas_documented_body(
    out: Out, name: str, fields: dict[str, Any], expected: dict[str, Any]
) -> None:
    reply = await out.send(**fields)
    assert reply.message.status == common_pb2.MESSAGE_STATUS_SENT, reply.message.error
    assert await out.bodies() == [{"recipient": {"id": out.customer}, **expected}]
    if "sender_action" not in expected:
        assert reply.message.external_id
        assert reply.message.direction == common_pb2.DIRECTION_OUTBOUND


async def test_reply_to_names_the_replied_message_by_our_id_or_by_its_mid(out: Out) -> None:
    first = await out.send(text="First")
    await out.send(text="Reply by id", reply_to_message_id=first.message.id)
    await out.send(text="Reply by mid", reply_to_message_id=first.message.external_id)
    mid = first.message.external_id
    bodies = await out.bodies()
    for body, text in zip(bodies[1:], ("Reply by id", "Reply by mid"), strict=True):
        assert body == {
            "recipient": {"id": out.customer},
            "message": {"text": text},
            "reply_to": {"mid": mid},
        }
    got = await out.get((await out.send(text="x", reply_to_message_id=first.message.id)).message.id)
    assert got.reply_to.message_external_id == mid
    assert got.reply_to.message_id == first.message.id


async def test_reaction_and_unreact_name_the_customers_message(out: Out) -> None:
    _, _, dm = await customer_writes(out.gateway, out.control, out.connection, "Love it")
    mid = str(dm["mid"])
    react = await out.send(reaction=messaging_pb2.Reaction(message_id=mid, emoji="❤️"))
    unreact = await out.send(reaction=messaging_pb2.Reaction(message_id=mid))
    assert react.message.status == unreact.message.status == common_pb2.MESSAGE_STATUS_SENT
    assert [b for b in await out.bodies()] == [
        {
            "recipient": {"id": out.customer},
            "sender_action": "react",
            "payload": {"message_id": mid, "reaction": "❤️"},
        },
        {
            "recipient": {"id": out.customer},
            "sender_action": "unreact",
            "payload": {"message_id": mid},
        },
    ]


async def test_recipient_may_be_named_by_conversation(out: Out) -> None:
    reply = await out.send(text="Hi again", conversation_id=out.conversation.id)
    assert reply.message.conversation_id == out.conversation.id
    assert reply.message.status == common_pb2.MESSAGE_STATUS_SENT


async def test_a_conversation_alone_sends_from_its_own_connection(out: Out) -> None:
    """connection_id may be left empty with a conversation_id: a conversation belongs to
    exactly one connection, even when the tenant has several."""
    account = await out.control.create_account(username="second")
    second = await store_connection(out.gateway, out.control, account, tenant=out.tenant)
    igsid, conversation, _ = await customer_writes(out.gateway, out.control, second)
    reply = await out.send(
        text="From the second", connection_id="", conversation_id=conversation.id
    )
    assert reply.message.status == common_pb2.MESSAGE_STATUS_SENT, reply.message.error
    assert reply.message.connection_id == second.id
    [record] = await out.control.sent(str(account["ig_id"]))
    assert record["body"]["recipient"] == {"id": igsid}
    assert await out.bodies() == []


async def test_facebook_login_connections_send_as_their_page(out: Out) -> None:
    account = await out.control.create_account(username="pageshop")
    conn = await store_connection(
        out.gateway, out.control, account, tenant=out.tenant, flow="facebook"
    )
    igsid, _, _ = await customer_writes(out.gateway, out.control, conn)
    reply = await out.send(text="From the page", connection_id=conn.id, recipient_id=igsid)
    assert reply.message.status == common_pb2.MESSAGE_STATUS_SENT, reply.message.error
    [record] = await out.control.sent(str(account["ig_id"]))
    assert record["host"] == "graph.facebook.com"
    assert f"/{account['page_id']}/messages" in record["path"]
    # Facebook Login's Send API names the heart reaction; Instagram Login's takes the emoji.
    _, _, dm = await customer_writes(out.gateway, out.control, conn, "Love it")
    reaction = messaging_pb2.Reaction(message_id=str(dm["mid"]), emoji="❤️")
    reacted = await out.send(reaction=reaction, connection_id=conn.id, recipient_id=igsid)
    assert reacted.message.status == common_pb2.MESSAGE_STATUS_SENT, reacted.message.error
    records = await out.control.sent(str(account["ig_id"]))
    assert records[-1]["body"]["payload"] == {"message_id": dm["mid"], "reaction": "love"}
