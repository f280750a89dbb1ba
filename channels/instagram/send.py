"""Sending on Instagram: Meta's Send API bodies (INSTAGRAM.md §4) and its usage headers.

Facebook-Login connections send as their page (``graph.facebook.com/{v}/{PAGE_ID}/messages``
with the page token); Instagram-Login connections as the account
(``graph.instagram.com/{v}/{IG_ID}/messages``). The token travels in the Authorization
header. Failures are classified once, by :mod:`channels.instagram.graph_client`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from channels.instagram.graph_client import GraphClient
from channels.instagram.settings import FLOW_FACEBOOK, InstagramSettings
from channels.instagram.usage import parse_usage, resume_at
from gateway.config import Secret
from gateway.domain.errors import ChannelRequestError
from gateway.domain.models import Connection
from gateway.domain.outbound import (
    HUMAN_AGENT,
    ContentKind,
    OutboundLimits,
    OutboundMessage,
    SendResult,
    TemplateElement,
)

GRAPH = "INSTAGRAM_GRAPH_URL"
GRAPH_FB = "INSTAGRAM_GRAPH_FACEBOOK_URL"
LIMITS = OutboundLimits()


def _element(e: TemplateElement) -> dict[str, Any]:
    out: dict[str, Any] = {"title": e.title}
    if e.subtitle:
        out["subtitle"] = e.subtitle
    if e.image_url:
        out["image_url"] = e.image_url
    if e.default_action_url:
        out["default_action"] = {"type": "web_url", "url": e.default_action_url}
    if e.buttons:
        out["buttons"] = [
            {"type": "web_url", "url": b.url, "title": b.title}
            if b.type == "web_url"
            else {"type": "postback", "title": b.title, "payload": b.payload}
            for b in e.buttons
        ]
    return out


def _message(m: OutboundMessage) -> dict[str, Any]:
    if m.kind is ContentKind.TEXT:
        message: dict[str, Any] = {"text": m.text}
        if m.quick_replies:
            message["quick_replies"] = [
                {"content_type": "text", "title": q.title, "payload": q.payload}
                for q in m.quick_replies
            ]
        return message
    if m.kind is ContentKind.ATTACHMENT:
        return {"attachment": {"type": m.attachment_type, "payload": {"url": m.url}}}
    if m.kind is ContentKind.STICKER:
        return {"attachment": {"type": m.sticker}}
    if m.kind is ContentKind.SHARE:
        return {"attachment": {"type": "MEDIA_SHARE", "payload": {"id": m.post_id}}}
    if m.kind is ContentKind.TEMPLATE:
        return {
            "attachment": {
                "type": "template",
                "payload": {
                    "template_type": "generic",
                    "elements": [_element(e) for e in m.elements],
                },
            }
        }
    raise ChannelRequestError(f"{m.kind.value} is not a message")


# Facebook Login's Send API (graph.facebook.com) documents a reaction by its name, "love",
# where Instagram Login's takes the emoji; its webhooks name it so too.
_FACEBOOK_REACTIONS = {"\u2764\ufe0f": "love", "\u2764": "love"}


def build_body(m: OutboundMessage, *, facebook_login: bool = False) -> dict[str, Any]:
    """The Send API's JSON body for one message, exactly as Meta documents it for the
    connection's login flow."""
    body: dict[str, Any] = {"recipient": {"id": m.recipient_id}}
    if m.kind is ContentKind.REACTION:
        if m.emoji:
            reaction = _FACEBOOK_REACTIONS.get(m.emoji, m.emoji) if facebook_login else m.emoji
            body["sender_action"] = "react"
            body["payload"] = {"message_id": m.reaction_external_id, "reaction": reaction}
        else:
            body["sender_action"] = "unreact"
            body["payload"] = {"message_id": m.reaction_external_id}
    elif m.kind is ContentKind.SENDER_ACTION:
        body["sender_action"] = m.sender_action
    else:
        body["message"] = _message(m)
        if m.reply_to_external_id:
            body["reply_to"] = {"mid": m.reply_to_external_id}
    if m.tag == HUMAN_AGENT and m.kind in LIMITS.tagged_kinds:
        # A message only: a sender action (typing, seen, a reaction) goes with nothing but
        # its recipient, and Meta refuses a tag beside it.
        body["messaging_type"] = "MESSAGE_TAG"
        body["tag"] = HUMAN_AGENT
    return body


class InstagramOutbound:
    """Implements :class:`gateway.domain.outbound.OutboundChannel` for Instagram."""

    limits = LIMITS

    def __init__(self, settings: Callable[[], InstagramSettings], graph: GraphClient) -> None:
        self._settings = settings
        self._graph = graph

    def endpoint(self, connection: Connection) -> tuple[str, str]:
        """(host setting, path) of the connection's Send API."""
        version = self._settings().graph_version
        if connection.login_flow == FLOW_FACEBOOK:
            return GRAPH_FB, f"/{version}/{connection.account.page_id}/messages"
        return GRAPH, f"/{version}/{connection.account.external_id}/messages"

    async def send(
        self, connection: Connection, token: Secret, message: OutboundMessage
    ) -> SendResult:
        host, path = self.endpoint(connection)
        body = build_body(message, facebook_login=connection.login_flow == FLOW_FACEBOOK)
        reply = await self._graph.call("POST", host, path, json=body, token=token, timed=False)
        data = reply.data
        return SendResult(
            external_id=str(data.get("message_id") or ""),
            recipient_id=str(data.get("recipient_id") or ""),
            pause_until=resume_at(parse_usage(reply.headers), datetime.now(UTC)),
        )
