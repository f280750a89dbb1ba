"""Webhooks: Meta's envelope and escaping, the signature, delivery, batching, retry, echoes."""

from __future__ import annotations

import hashlib
import hmac
import json

import aiohttp
import pytest

from channels.instagram.sandbox import (
    RunningSandbox,
    SandboxClient,
    SandboxControlError,
    sign_webhook,
)

from .conftest import Receiver


def verify(secret: str, body: bytes, header: str) -> bool:
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, header)


def test_signature_matches_metas_test_vector() -> None:
    assert sign_webhook("It's a Secret to Everybody", b"Hello, World!") == (
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    )


async def test_a_dm_is_signed_and_posted_in_metas_format(
    sandbox: RunningSandbox, control: SandboxClient, receiver: Receiver
) -> None:
    await control.set_webhook(receiver.url)
    account = await control.create_account()
    result = await control.send_dm(account["ig_id"], "héllo 👋 https://x.example/a")
    assert result["status"] == 200

    [post] = receiver.posts
    secret = sandbox.settings.instagram_app_secret
    assert verify(secret, post.body, post.headers["X-Hub-Signature-256"])
    assert post.headers["X-Hub-Signature-256"] == result["signature"]
    # Meta escapes "/" and writes non-ASCII as \u escapes: verify raw bytes, never re-serialize.
    assert b"\\/" in post.body
    assert b"\\ud83d\\udc4b" in post.body
    assert post.body.decode() == result["raw"]

    payload = json.loads(post.body)
    assert payload == result["payload"]
    assert payload["object"] == "instagram"
    [entry] = payload["entry"]
    assert entry["id"] == account["ig_id"]
    assert isinstance(entry["time"], int)
    [item] = entry["messaging"]
    assert item["sender"] == {"id": result["customer"]}
    assert item["recipient"] == {"id": account["ig_id"]}
    assert item["message"] == {"mid": result["mid"], "text": "héllo 👋 https://x.example/a"}
    assert abs(item["timestamp"] - entry["time"]) < 1000


async def test_facebook_flow_accounts_are_signed_with_the_facebook_secret(
    sandbox: RunningSandbox, control: SandboxClient, receiver: Receiver
) -> None:
    await control.set_webhook(receiver.url)
    account = await control.create_account(flow="facebook")
    await control.send_dm(account["ig_id"])
    [post] = receiver.posts
    assert verify(
        sandbox.settings.facebook_app_secret, post.body, post.headers["X-Hub-Signature-256"]
    )


async def test_every_customer_action_has_metas_shape(
    control: SandboxClient, receiver: Receiver
) -> None:
    await control.set_webhook(receiver.url)
    account = (await control.create_account())["ig_id"]
    dm = await control.send_dm(account, "hi")
    who, mid = dm["customer"], dm["mid"]
    actions = {
        "reaction": {"mid": mid, "reaction": "love", "emoji": "❤️"},
        "read": {"mid": mid},
        "edit": {"mid": mid, "text": "hi!", "num_edit": 1},
        "unsend": {"mid": mid},
        "postback": {"title": "Start", "payload": "START"},
        "referral": {"ref": "summer", "source": "SHORTLINK"},
    }
    items = {}
    for kind, fields in actions.items():
        result = await control.event(kind, account, customer=who, **fields)
        assert result["status"] == 200
        items[kind] = result["payload"]["entry"][0]["messaging"][0]
    assert items["reaction"]["reaction"] == {
        "mid": mid,
        "action": "react",
        "reaction": "love",
        "emoji": "❤️",
    }
    assert items["read"]["read"] == {"mid": mid}
    assert items["edit"]["message_edit"] == {"mid": mid, "text": "hi!", "num_edit": 1}
    assert items["unsend"]["message"] == {"mid": mid, "is_deleted": True}
    assert items["postback"]["postback"]["payload"] == "START"
    assert items["referral"]["referral"] == {
        "ref": "summer",
        "source": "SHORTLINK",
        "type": "OPEN_THREAD",
    }
    assert all(item["sender"] == {"id": who} for item in items.values())
    assert len(receiver.posts) == 1 + len(actions)

    unreact = await control.event("reaction", account, customer=who, mid=mid, action="unreact")
    assert unreact["payload"]["entry"][0]["messaging"][0]["reaction"] == {
        "mid": mid,
        "action": "unreact",
    }


async def test_messages_can_carry_attachments_replies_and_quick_reply_payloads(
    control: SandboxClient, receiver: Receiver
) -> None:
    await control.set_webhook(receiver.url)
    account = (await control.create_account())["ig_id"]
    result = await control.send_dm(
        account,
        "Yes",
        quick_reply="YES_PAYLOAD",
        reply_to={"mid": "aWdfZAG1prev"},
        attachments=[{"type": "image", "payload": {"url": "https://cdn.example/p.jpg"}}],
    )
    message = result["payload"]["entry"][0]["messaging"][0]["message"]
    assert message["quick_reply"] == {"payload": "YES_PAYLOAD"}
    assert message["reply_to"] == {"mid": "aWdfZAG1prev"}
    assert message["attachments"][0]["type"] == "image"


async def test_batches_hold_several_items_and_entries(
    control: SandboxClient, receiver: Receiver
) -> None:
    await control.set_webhook(receiver.url)
    first = (await control.create_account())["ig_id"]
    second = (await control.create_account())["ig_id"]
    result = await control.batch(
        [
            {"kind": "message", "account": first, "text": "one"},
            {"kind": "message", "account": first, "text": "two"},
            {"kind": "read", "account": second},
        ]
    )
    assert result["status"] == 200
    [post] = receiver.posts
    entries = json.loads(post.body)["entry"]
    assert [e["id"] for e in entries] == [first, second]
    assert [m["message"]["text"] for m in entries[0]["messaging"]] == ["one", "two"]

    result = await control.batch(
        [{"kind": "message", "account": first}, {"kind": "message", "account": first}],
        entry_per_item=True,
    )
    assert len(result["payload"]["entry"]) == 2


async def test_a_failed_delivery_reports_the_status_and_can_be_retried_byte_for_byte(
    control: SandboxClient, receiver: Receiver
) -> None:
    await control.set_webhook(receiver.url)
    account = (await control.create_account())["ig_id"]
    receiver.statuses = [500]
    result = await control.send_dm(account, "retry me")
    assert result["status"] == 500

    retried = await control.retry_delivery(result["delivery_id"])
    assert retried["status"] == 200
    assert retried["attempts"] == 2
    first, second = receiver.posts
    assert first.body == second.body
    assert first.headers["X-Hub-Signature-256"] == second.headers["X-Hub-Signature-256"]


async def test_an_unreachable_webhook_is_reported_not_raised(control: SandboxClient) -> None:
    await control.set_webhook("http://127.0.0.1:9/unreachable")
    account = (await control.create_account())["ig_id"]
    result = await control.send_dm(account)
    assert result["status"] is None
    assert result["error"]


async def test_built_but_not_delivered_payloads_come_back_signed(
    sandbox: RunningSandbox, control: SandboxClient
) -> None:
    account = (await control.create_account())["ig_id"]
    result = await control.send_dm(account, "x", deliver=False)
    assert result["status"] is None
    assert result["signature"] == sign_webhook(
        sandbox.settings.instagram_app_secret, result["raw"].encode()
    )


async def test_sent_messages_produce_an_echo_when_the_app_is_subscribed(
    http: aiohttp.ClientSession,
    sandbox: RunningSandbox,
    control: SandboxClient,
    receiver: Receiver,
    urls: dict[str, str],
) -> None:
    await control.set_webhook(receiver.url)
    account = (await control.create_account())["ig_id"]
    token = (await control.issue_token(account))["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    graph = urls["INSTAGRAM_GRAPH_URL"] + f"/v21.0/{account}"
    await http.post(
        graph + "/subscribed_apps", params={"subscribed_fields": "messages"}, headers=auth
    )
    dm = await control.send_dm(account, "hi")
    receiver.posts.clear()

    response = await http.post(
        graph + "/messages",
        json={"recipient": {"id": dm["customer"]}, "message": {"text": "Hello from us"}},
        headers=auth,
    )
    sent = await response.json()
    await control.drain_echoes()

    [post] = receiver.posts
    assert verify(
        sandbox.settings.instagram_app_secret, post.body, post.headers["X-Hub-Signature-256"]
    )
    [item] = json.loads(post.body)["entry"][0]["messaging"]
    assert item["sender"] == {"id": account}
    assert item["recipient"] == {"id": dm["customer"]}
    assert item["message"] == {"mid": sent["message_id"], "text": "Hello from us", "is_echo": True}
    [echo] = await control.deliveries("echo")
    assert echo["status"] == 200


async def test_echoes_are_retried_until_the_endpoint_accepts(
    http: aiohttp.ClientSession, control: SandboxClient, receiver: Receiver, urls: dict[str, str]
) -> None:
    await control.set_webhook(receiver.url)
    account = (await control.create_account())["ig_id"]
    token = (await control.issue_token(account))["access_token"]
    graph = urls["INSTAGRAM_GRAPH_URL"] + f"/v21.0/{account}"
    auth = {"Authorization": f"Bearer {token}"}
    await http.post(
        graph + "/subscribed_apps", params={"subscribed_fields": "messages"}, headers=auth
    )
    dm = await control.send_dm(account)
    receiver.statuses = [503]
    await http.post(
        graph + "/messages",
        json={"recipient": {"id": dm["customer"]}, "message": {"text": "x"}},
        headers=auth,
    )
    await control.drain_echoes()
    [echo] = await control.deliveries("echo")
    assert (echo["status"], echo["attempts"]) == (200, 2)


async def test_no_echo_without_a_subscription(
    http: aiohttp.ClientSession, control: SandboxClient, receiver: Receiver, urls: dict[str, str]
) -> None:
    await control.set_webhook(receiver.url)
    account = (await control.create_account())["ig_id"]
    token = (await control.issue_token(account))["access_token"]
    dm = await control.send_dm(account)
    await http.post(
        urls["INSTAGRAM_GRAPH_URL"] + f"/v21.0/{account}/messages",
        json={"recipient": {"id": dm["customer"]}, "message": {"text": "x"}},
        headers={"Authorization": f"Bearer {token}"},
    )
    await control.drain_echoes()
    assert await control.deliveries("echo") == []


async def test_setting_the_webhook_can_run_metas_verification_handshake(
    control: SandboxClient, receiver: Receiver
) -> None:
    result = await control.set_webhook(receiver.url, verify=True)
    assert result["verification"] == {"status": 200, "verified": True}
    receiver.verify_token = "something else"
    result = await control.set_webhook(receiver.url, verify=True)
    assert result["verification"] == {"status": 403, "verified": False}


async def test_customer_events_without_a_webhook_url_are_refused(control: SandboxClient) -> None:
    account = (await control.create_account())["ig_id"]
    with pytest.raises(SandboxControlError) as raised:
        await control.send_dm(account)
    assert raised.value.status == 409
