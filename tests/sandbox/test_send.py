"""The Send API: bodies recorded exactly, Meta's validation, the window, injected errors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from channels.instagram.sandbox import RunningSandbox, SandboxClient, SandboxControlError

from .flows import error_of


@dataclass
class Thread:
    """A connected Instagram-Login account and a customer who wrote in just now."""

    ig_id: str
    token: str
    igsid: str
    url: str

    async def send(self, http: aiohttp.ClientSession, body: Any) -> aiohttp.ClientResponse:
        return await http.post(
            self.url, json=body, headers={"Authorization": f"Bearer {self.token}"}
        )


@pytest.fixture
async def thread(control: SandboxClient, urls: dict[str, str]) -> Thread:
    account = await control.create_account()
    token = (await control.issue_token(account["ig_id"]))["access_token"]
    customer = await control.create_customer(account["ig_id"], messaged=True)
    url = urls["INSTAGRAM_GRAPH_URL"] + f"/v21.0/{account['ig_id']}/messages"
    return Thread(account["ig_id"], token, customer["igsid"], url)


async def test_text_is_sent_and_its_exact_body_recorded(
    http: aiohttp.ClientSession, control: SandboxClient, thread: Thread
) -> None:
    raw = json.dumps({"recipient": {"id": thread.igsid}, "message": {"text": "Hi ✨ there"}})
    response = await http.post(
        thread.url,
        data=raw,
        headers={"Authorization": f"Bearer {thread.token}", "Content-Type": "application/json"},
    )
    body = await response.json()
    assert response.status == 200
    assert body["recipient_id"] == thread.igsid
    assert body["message_id"].startswith("aWdfZAG1")
    assert "x-app-usage" in response.headers

    [sent] = await control.sent(thread.ig_id)
    assert sent["raw"] == raw
    assert sent["body"] == {"recipient": {"id": thread.igsid}, "message": {"text": "Hi ✨ there"}}
    assert sent["status"] == 200
    assert sent["response"] == body
    assert sent["host"] == "graph.instagram.com"


async def test_facebook_flow_sends_through_the_page_with_the_token_as_a_parameter(
    http: aiohttp.ClientSession, control: SandboxClient, urls: dict[str, str]
) -> None:
    account = await control.create_account(flow="facebook")
    token = (await control.issue_token(account["ig_id"], "page"))["access_token"]
    customer = await control.create_customer(account["ig_id"], messaged=True)
    response = await http.post(
        urls["INSTAGRAM_GRAPH_FACEBOOK_URL"] + f"/v21.0/{account['page_id']}/messages",
        params={"access_token": token},
        json={"recipient": {"id": customer["igsid"]}, "message": {"text": "hello"}},
    )
    assert response.status == 200
    assert (await response.json())["recipient_id"] == customer["igsid"]
    [sent] = await control.sent()
    assert sent["page_id"] == account["page_id"]
    assert sent["host"] == "graph.facebook.com"


async def test_reactions_and_sender_actions_answer_recipient_id_only(
    http: aiohttp.ClientSession, thread: Thread
) -> None:
    for body in (
        {"sender_action": "react", "payload": {"message_id": "aWdfZAG1x", "reaction": "love"}},
        {"sender_action": "unreact", "payload": {"message_id": "aWdfZAG1x"}},
        {"sender_action": "typing_on"},
        {"sender_action": "mark_seen"},
    ):
        response = await thread.send(http, {"recipient": {"id": thread.igsid}, **body})
        assert response.status == 200, await response.text()
        assert await response.json() == {"recipient_id": thread.igsid}


@pytest.mark.parametrize(
    ("message", "accepted"),
    [
        ({"text": "é" * 500}, True),  # 1000 bytes
        ({"text": "é" * 500 + "x"}, False),  # 1001 bytes, 501 characters
        ({"text": "a" * 1001}, False),
        ({"text": ""}, False),
        (
            {
                "text": "q",
                "quick_replies": [
                    {"content_type": "text", "title": f"o{i}", "payload": "p"} for i in range(13)
                ],
            },
            True,
        ),
        (
            {
                "text": "q",
                "quick_replies": [
                    {"content_type": "text", "title": f"o{i}", "payload": "p"} for i in range(14)
                ],
            },
            False,
        ),
        (
            {
                "text": "q",
                "quick_replies": [{"content_type": "text", "title": "t" * 20, "payload": "p"}],
            },
            True,
        ),
        (
            {
                "text": "q",
                "quick_replies": [{"content_type": "text", "title": "t" * 21, "payload": "p"}],
            },
            False,
        ),
        ({"attachment": {"type": "image", "payload": {"url": "https://cdn.example/a.png"}}}, True),
        ({"attachment": {"type": "image", "payload": {}}}, False),
        ({"attachment": {"type": "hologram", "payload": {"url": "https://x"}}}, False),
        ({"attachment": {"type": "like_heart"}}, True),
        ({"attachment": {"type": "MEDIA_SHARE", "payload": {"id": "1789"}}}, True),
        (
            {
                "attachments": [
                    {"type": "image", "payload": {"url": f"https://x/{i}.png"}} for i in range(10)
                ]
            },
            True,
        ),
        (
            {
                "attachments": [
                    {"type": "image", "payload": {"url": f"https://x/{i}.png"}} for i in range(11)
                ]
            },
            False,
        ),
        (
            {
                "attachment": {
                    "type": "template",
                    "payload": {
                        "template_type": "generic",
                        "elements": [{"title": "Shoe", "subtitle": "42"}],
                    },
                }
            },
            True,
        ),
        ({"attachment": {"type": "template", "payload": {"template_type": "generic"}}}, False),
        ({"text": "a", "attachment": {"type": "like_heart"}}, False),
    ],
)
async def test_message_bodies_are_validated_as_meta_does(
    http: aiohttp.ClientSession, thread: Thread, message: dict[str, Any], accepted: bool
) -> None:
    response = await thread.send(http, {"recipient": {"id": thread.igsid}, "message": message})
    if accepted:
        assert response.status == 200, await response.text()
    else:
        assert response.status == 400
        assert (await error_of(response))["code"] == 100


async def test_an_unknown_recipient_is_no_matching_user(
    http: aiohttp.ClientSession, thread: Thread
) -> None:
    response = await thread.send(http, {"recipient": {"id": "999"}, "message": {"text": "hi"}})
    error = await error_of(response)
    assert (error["code"], error["error_subcode"]) == (100, 2018001)


async def test_outside_the_24_hour_window_only_a_human_agent_reply_within_7_days_passes(
    http: aiohttp.ClientSession, control: SandboxClient, thread: Thread
) -> None:
    text = {"recipient": {"id": thread.igsid}, "message": {"text": "late"}}
    tagged = {**text, "messaging_type": "MESSAGE_TAG", "tag": "HUMAN_AGENT"}
    await control.advance_clock(24 * 3600 + 60)

    response = await thread.send(http, text)
    error = await error_of(response)
    assert (error["code"], error["error_subcode"]) == (10, 2534022)
    assert (await thread.send(http, tagged)).status == 200

    await control.advance_clock(6 * 24 * 3600)
    error = await error_of(await thread.send(http, tagged))
    assert (error["code"], error["error_subcode"]) == (10, 2534022)

    # A new message from the customer reopens the window.
    await control.send_dm(thread.ig_id, "back again", customer=thread.igsid, deliver=False)
    assert (await thread.send(http, text)).status == 200


async def test_each_host_refuses_a_send_outside_the_window_in_its_own_shape(
    http: aiohttp.ClientSession, control: SandboxClient, urls: dict[str, str]
) -> None:
    account = await control.create_account(flow="facebook")
    token = (await control.issue_token(account["ig_id"], "page"))["access_token"]
    customer = await control.create_customer(account["ig_id"], messaged=True)
    await control.advance_clock(24 * 3600 + 60)
    body = {"recipient": {"id": customer["igsid"]}, "message": {"text": "late"}}
    page = f"/v21.0/{account['page_id']}/messages"
    response = await http.post(
        urls["INSTAGRAM_GRAPH_FACEBOOK_URL"] + page, params={"access_token": token}, json=body
    )
    error = await error_of(response)
    assert response.status == 403
    assert (error["code"], error["error_subcode"], error["type"]) == (
        10,
        2018278,
        "OAuthException",
    )

    ig = await control.create_account()
    ig_token = (await control.issue_token(ig["ig_id"]))["access_token"]
    silent = await control.create_customer(ig["ig_id"])
    response = await http.post(
        urls["INSTAGRAM_GRAPH_URL"] + f"/v21.0/{ig['ig_id']}/messages",
        headers={"Authorization": f"Bearer {ig_token}"},
        json={"recipient": {"id": silent["igsid"]}, "message": {"text": "late"}},
    )
    error = await error_of(response)
    assert response.status == 403
    assert (error["code"], error["error_subcode"], error["type"]) == (
        10,
        2534022,
        "IGApiException",
    )


async def test_a_customer_who_never_wrote_cannot_be_messaged(
    http: aiohttp.ClientSession, control: SandboxClient, thread: Thread
) -> None:
    silent = await control.create_customer(thread.ig_id)
    response = await thread.send(
        http, {"recipient": {"id": silent["igsid"]}, "message": {"text": "x"}}
    )
    assert (await error_of(response))["error_subcode"] == 2534022


async def test_injected_throttling_carries_the_usage_headers_then_clears(
    http: aiohttp.ClientSession, control: SandboxClient, thread: Thread
) -> None:
    await control.inject_error(
        80002, account=thread.ig_id, count=2, estimated_time_to_regain_access=7
    )
    body = {"recipient": {"id": thread.igsid}, "message": {"text": "hi"}}
    for _ in range(2):
        response = await thread.send(http, body)
        error = await error_of(response)
        assert error["code"] == 80002
        assert json.loads(response.headers["x-app-usage"])["call_count"] == 100
        usage = json.loads(response.headers["x-business-use-case-usage"])
        [bucket] = usage[thread.ig_id]
        assert bucket["type"] == "instagram"
        assert bucket["estimated_time_to_regain_access"] == 7
    assert (await thread.send(http, body)).status == 200
    # Refused calls are recorded too, with Meta's answer.
    assert [s["status"] for s in await control.sent(thread.ig_id)] == [400, 400, 200]


async def test_usage_set_for_an_account_rides_on_its_successful_sends_then_clears(
    http: aiohttp.ClientSession, control: SandboxClient, thread: Thread, urls: dict[str, str]
) -> None:
    other = await control.create_account()
    other_token = (await control.issue_token(other["ig_id"]))["access_token"]
    other_customer = await control.create_customer(other["ig_id"], messaged=True)
    limit = {"call_count": 100, "total_time": 97, "total_cputime": 100}
    rule = await control.set_usage(
        thread.ig_id,
        business_use_case={**limit, "estimated_time_to_regain_access": 3},
        app={"call_count": 99},
        count=2,
    )
    assert rule["remaining"] == 2
    assert [u["account"] for u in await control.usage()] == [thread.ig_id]
    body = {"recipient": {"id": thread.igsid}, "message": {"text": "hi"}}
    # A refused call neither carries the setting nor uses it up.
    bad = await thread.send(http, {"recipient": {"id": thread.igsid}, "message": {}})
    assert bad.status == 400
    for _ in range(2):
        response = await thread.send(http, body)
        assert response.status == 200
        [bucket] = json.loads(response.headers["x-business-use-case-usage"])[thread.ig_id]
        assert bucket == {"type": "instagram", **limit, "estimated_time_to_regain_access": 3}
        app = json.loads(response.headers["x-app-usage"])
        assert app["call_count"] == 99
        assert app["total_time"] < 100  # fields left out keep the sandbox's own count
    # Another account is not affected.
    response = await http.post(
        urls["INSTAGRAM_GRAPH_URL"] + f"/v21.0/{other['ig_id']}/messages",
        json={"recipient": {"id": other_customer["igsid"]}, "message": {"text": "hi"}},
        headers={"Authorization": f"Bearer {other_token}"},
    )
    assert response.status == 200
    [bucket] = json.loads(response.headers["x-business-use-case-usage"])[other["ig_id"]]
    assert bucket["estimated_time_to_regain_access"] == 0
    # After `count` sends the account is back to the sandbox's own figures.
    assert await control.usage() == []
    response = await thread.send(http, body)
    [bucket] = json.loads(response.headers["x-business-use-case-usage"])[thread.ig_id]
    assert bucket["estimated_time_to_regain_access"] == 0
    assert bucket["call_count"] < 100


async def test_usage_without_a_count_lasts_until_cleared_and_is_validated(
    http: aiohttp.ClientSession, control: SandboxClient, thread: Thread
) -> None:
    await control.set_usage(thread.ig_id, business_use_case={"estimated_time_to_regain_access": 1})
    body = {"recipient": {"id": thread.igsid}, "message": {"text": "hi"}}
    for _ in range(3):
        response = await thread.send(http, body)
        [bucket] = json.loads(response.headers["x-business-use-case-usage"])[thread.ig_id]
        assert bucket["estimated_time_to_regain_access"] == 1
    await control.clear_usage(thread.ig_id)
    response = await thread.send(http, body)
    [bucket] = json.loads(response.headers["x-business-use-case-usage"])[thread.ig_id]
    assert bucket["estimated_time_to_regain_access"] == 0
    bad: list[tuple[dict[str, Any], int | None, int]] = [
        ({}, None, 400),
        ({"app": {"estimated_time_to_regain_access": 1}}, None, 400),
        ({"business_use_case": {"call_count": -1}}, None, 400),
        ({"business_use_case": {"call_count": 1}}, 0, 400),
    ]
    for fields, count, status in bad:
        with pytest.raises(SandboxControlError) as caught:
            await control.set_usage(thread.ig_id, count=count, **fields)
        assert caught.value.status == status, fields
    with pytest.raises(SandboxControlError) as caught:
        await control.set_usage("404", business_use_case={"call_count": 1})
    assert caught.value.status == 404


async def test_injected_errors_can_be_permanent_and_scoped_to_one_account(
    http: aiohttp.ClientSession, control: SandboxClient, thread: Thread, urls: dict[str, str]
) -> None:
    other = await control.create_account()
    other_token = (await control.issue_token(other["ig_id"]))["access_token"]
    other_customer = await control.create_customer(other["ig_id"], messaged=True)
    await control.inject_error(551, account=thread.ig_id, always=True)
    body = {"recipient": {"id": thread.igsid}, "message": {"text": "hi"}}
    for _ in range(3):
        error = await error_of(await thread.send(http, body))
        assert (error["code"], error["error_subcode"]) == (551, 1545041)
    response = await http.post(
        urls["INSTAGRAM_GRAPH_URL"] + "/v21.0/me/messages",
        json={"recipient": {"id": other_customer["igsid"]}, "message": {"text": "hi"}},
        headers={"Authorization": f"Bearer {other_token}"},
    )
    assert response.status == 200
    await control.clear_errors()
    assert (await thread.send(http, body)).status == 200


async def test_transient_errors_are_500_and_marked_transient(
    http: aiohttp.ClientSession, control: SandboxClient, thread: Thread
) -> None:
    await control.inject_error(2)
    response = await thread.send(
        http, {"recipient": {"id": thread.igsid}, "message": {"text": "x"}}
    )
    assert response.status == 500
    error = await error_of(response)
    assert error["code"] == 2
    assert error["is_transient"] is True


async def test_a_revoked_token_cannot_send(
    http: aiohttp.ClientSession, control: SandboxClient, thread: Thread
) -> None:
    await control.revoke(token=thread.token)
    response = await thread.send(
        http, {"recipient": {"id": thread.igsid}, "message": {"text": "x"}}
    )
    assert (await error_of(response))["code"] == 190


async def test_latency_setting_delays_meta_calls_but_not_the_control_api(
    http: aiohttp.ClientSession, sandbox: RunningSandbox, control: SandboxClient, thread: Thread
) -> None:
    import time

    await control.update_settings(latency_ms=80)
    started = time.monotonic()
    await thread.send(http, {"recipient": {"id": thread.igsid}, "message": {"text": "x"}})
    assert time.monotonic() - started >= 0.08
    started = time.monotonic()
    await control.clock()
    assert time.monotonic() - started < 0.08
    assert sandbox.state.latency_ms == 80
