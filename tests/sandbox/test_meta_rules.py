"""Where the sandbox and the gateway's Instagram client must do as Meta documents
(INSTAGRAM.md and Meta's developer pages): the webhook handshake's status, a template card
with only a title, a sender action with a message tag. Each test states Meta's
behaviour."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from channels.instagram.sandbox import RunningSandbox, SandboxClient
from channels.instagram.send import build_body
from gateway.domain.outbound import HUMAN_AGENT, ContentKind, OutboundMessage

from .flows import error_of


@pytest.fixture
async def challenge_echoing_failure() -> AsyncIterator[str]:
    """A webhook endpoint that echoes hub.challenge in its body, but with HTTP 403: the
    answer a receiver gives when it refuses the handshake yet prints what it was sent."""

    async def get(request: web.Request) -> web.Response:
        return web.Response(status=403, text=request.query.get("hub.challenge", ""))

    app = web.Application()
    app.router.add_get("/webhooks/instagram", get)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/webhooks/instagram"
    finally:
        await runner.cleanup()


async def test_webhook_verification_requires_http_200(
    control: SandboxClient, challenge_echoing_failure: str
) -> None:
    """INSTAGRAM.md §2: verification succeeds on "200 with the challenge as plain text";
    Meta's dashboard refuses a callback URL that answers anything but 200."""
    result = await control.set_webhook(challenge_echoing_failure, verify=True)
    verification = result["verification"]
    assert verification["status"] == 403
    assert verification["verified"] is False


async def test_generic_template_element_with_only_a_title_is_refused(
    http: aiohttp.ClientSession, control: SandboxClient, urls: dict[str, str]
) -> None:
    """Meta refuses a generic-template element that has a title and nothing else (code 100,
    "Incomplete element data: title and at least one other field (image url, subtitle or
    buttons) is required"); the gateway's own validator says so too."""
    account = await control.create_account()
    token = (await control.issue_token(account["ig_id"]))["access_token"]
    customer = await control.create_customer(account["ig_id"], messaged=True)
    body = {
        "recipient": {"id": customer["igsid"]},
        "message": {
            "attachment": {
                "type": "template",
                "payload": {"template_type": "generic", "elements": [{"title": "Only a title"}]},
            }
        },
    }
    response = await http.post(
        urls["INSTAGRAM_GRAPH_URL"] + f"/v21.0/{account['ig_id']}/messages",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status == 400, await response.text()
    assert (await error_of(response))["code"] == 100


@pytest.mark.parametrize(
    "message",
    [
        OutboundMessage(ContentKind.SENDER_ACTION, recipient_id="1", sender_action="typing_on"),
        OutboundMessage(ContentKind.SENDER_ACTION, recipient_id="1", sender_action="mark_seen"),
    ],
)
def test_tagged_sender_action_carries_no_message_tag(message: OutboundMessage) -> None:
    """Meta's Send API reference: sender_action "can only be sent with the recipient
    field" (INSTAGRAM.md §4: typing_on/typing_off/mark_seen "with no message"). A human
    agent's typing indicator (tag HUMAN_AGENT on the request) must not add messaging_type
    and tag to the body."""
    from dataclasses import replace

    body = build_body(replace(message, tag=HUMAN_AGENT))
    assert set(body) == {"recipient", "sender_action"}


async def test_sandbox_refuses_sender_action_with_message_tag(
    http: aiohttp.ClientSession, control: SandboxClient, sandbox: RunningSandbox
) -> None:
    """The sandbox's side of the same rule: Meta accepts sender_action only beside recipient."""
    urls = sandbox.base_urls()
    account = await control.create_account()
    token = (await control.issue_token(account["ig_id"]))["access_token"]
    customer = await control.create_customer(account["ig_id"], messaged=True)
    response = await http.post(
        urls["INSTAGRAM_GRAPH_URL"] + f"/v21.0/{account['ig_id']}/messages",
        json={
            "recipient": {"id": customer["igsid"]},
            "sender_action": "typing_on",
            "messaging_type": "MESSAGE_TAG",
            "tag": HUMAN_AGENT,
        },
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status == 400, await response.text()
    assert (await error_of(response))["code"] == 100
