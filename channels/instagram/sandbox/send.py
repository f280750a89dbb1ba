"""The Send API on both hosts: Meta's validation, the messaging window, the echo webhook."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from . import errors, ids
from .common import (
    NODE,
    SENDER,
    VERSION,
    bearer_or_param,
    graph_error_response,
    injected,
    state_of,
    usage_headers,
)
from .errors import GraphError
from .state import (
    HUMAN_AGENT_WINDOW_S,
    WINDOW_S,
    Account,
    Flow,
    SandboxState,
    SentRecord,
    Token,
)
from .webhooks import entry, envelope, secret_for

MAX_TEXT_BYTES = 1000
MAX_QUICK_REPLIES = 13
MAX_QUICK_REPLY_TITLE = 20
MAX_IMAGES = 10
URL_TYPES = frozenset({"image", "video", "audio", "file"})
ATTACHMENT_TYPES = URL_TYPES | {"template", "like_heart", "MEDIA_SHARE"}
TEMPLATE_TYPES = frozenset({"generic", "button", "product"})
SENDER_ACTIONS = frozenset({"typing_on", "typing_off", "mark_seen", "react", "unreact"})
MESSAGING_TYPES = frozenset({"RESPONSE", "UPDATE", "MESSAGE_TAG"})
# What a generic template card needs beside its title.
_CARD_FIELDS = ("subtitle", "image_url", "buttons", "default_action")
QUICK_REPLY_TYPES = frozenset({"text", "user_phone_number", "user_email"})


def _bad(message: str, subcode: int | None = None) -> GraphError:
    return errors.invalid_parameter(message, subcode=subcode)


def parse_body(content_type: str, raw: str) -> Any:
    """The request body as Graph reads it: JSON, or form fields whose values may be JSON."""
    if content_type == "application/x-www-form-urlencoded":
        body: dict[str, Any] = {}
        for key, value in parse_qsl(raw, keep_blank_values=True):
            try:
                body[key] = json.loads(value) if value[:1] in "{[" else value
            except ValueError:
                body[key] = value
        return body
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        raise _bad("Invalid JSON in the request body") from None


def _validate_attachment(attachment: Any, where: str) -> None:
    if not isinstance(attachment, dict):
        raise _bad(f"param {where} must be an object")
    kind = attachment.get("type")
    if kind not in ATTACHMENT_TYPES:
        raise _bad(f"param {where}[type] must be one of {{{', '.join(sorted(ATTACHMENT_TYPES))}}}")
    payload = attachment.get("payload")
    if kind == "like_heart":
        return
    if not isinstance(payload, dict):
        raise _bad(f"param {where}[payload] must be an object")
    if kind in URL_TYPES and not (payload.get("url") or payload.get("attachment_id")):
        raise _bad(f"param {where}[payload][url] is required", 2018047)
    if kind == "MEDIA_SHARE" and not payload.get("id"):
        raise _bad(f"param {where}[payload][id] is required")
    if kind == "template":
        if payload.get("template_type") not in TEMPLATE_TYPES:
            raise _bad(f"param {where}[payload][template_type] is invalid")
        elements = payload.get("elements")
        if payload["template_type"] == "generic":
            if not isinstance(elements, list) or not 1 <= len(elements) <= 10:
                raise _bad(f"param {where}[payload][elements] must hold 1 to 10 elements")
            for element in elements:
                if not isinstance(element, dict) or not element.get("title"):
                    raise _bad(f"param {where}[payload][elements][title] is required")
                if not any(element.get(k) for k in _CARD_FIELDS):
                    raise _bad(
                        "Incomplete element data: title and at least one other field"
                        " (image url, subtitle or buttons) is required"
                    )
                if len(element.get("buttons") or []) > 3:
                    raise _bad(f"param {where}[payload][elements][buttons] holds at most 3")


def _validate_message(message: Any) -> None:
    if not isinstance(message, dict):
        raise _bad("param message must be an object")
    parts = [k for k in ("text", "attachment", "attachments") if k in message]
    if len(parts) != 1:
        raise _bad("param message must have exactly one of text, attachment or attachments")
    if "text" in message:
        text = message["text"]
        if not isinstance(text, str) or not text:
            raise _bad("param message[text] must be a non-empty UTF-8 encoded string")
        if len(text.encode()) > MAX_TEXT_BYTES:
            raise _bad(
                f"Length of param message[text] must be less than or equal to {MAX_TEXT_BYTES}"
            )
    if "attachment" in message:
        _validate_attachment(message["attachment"], "message[attachment]")
    if "attachments" in message:
        items = message["attachments"]
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_IMAGES:
            raise _bad(f"param message[attachments] must hold 1 to {MAX_IMAGES} images")
        for item in items:
            _validate_attachment(item, "message[attachments]")
            if item.get("type") != "image":
                raise _bad("param message[attachments] may only hold images")
    quick = message.get("quick_replies")
    if quick is not None:
        if "text" not in message:
            raise _bad("param message[quick_replies] needs message[text]")
        if not isinstance(quick, list) or not 1 <= len(quick) <= MAX_QUICK_REPLIES:
            raise _bad(f"param message[quick_replies] must hold 1 to {MAX_QUICK_REPLIES} items")
        for reply in quick:
            if not isinstance(reply, dict) or reply.get("content_type") not in QUICK_REPLY_TYPES:
                raise _bad("param message[quick_replies][content_type] is invalid")
            if reply["content_type"] == "text":
                title = reply.get("title")
                if not isinstance(title, str) or not 1 <= len(title) <= MAX_QUICK_REPLY_TITLE:
                    raise _bad(
                        "param message[quick_replies][title] must be 1 to"
                        f" {MAX_QUICK_REPLY_TITLE} characters"
                    )
                if not reply.get("payload"):
                    raise _bad("param message[quick_replies][payload] is required")


def validate(body: Any) -> tuple[str, bool]:
    """Check a Send API body as Meta does: (recipient IGSID, whether the HUMAN_AGENT tag is set)."""
    if not isinstance(body, dict):
        raise _bad("The request body must be an object")
    recipient = body.get("recipient")
    if not isinstance(recipient, dict) or not recipient.get("id"):
        raise _bad("The parameter recipient is required")
    has_message, action = "message" in body, body.get("sender_action")
    if has_message == (action is not None):
        raise _bad("Exactly one of message and sender_action is required")
    if action is not None:
        if "messaging_type" in body or "tag" in body:
            raise _bad("param sender_action must be sent with the recipient field only")
        if action not in SENDER_ACTIONS:
            raise _bad(
                f"param sender_action must be one of {{{', '.join(sorted(SENDER_ACTIONS))}}}"
            )
        if action in ("react", "unreact"):
            payload = body.get("payload")
            if not isinstance(payload, dict) or not payload.get("message_id"):
                raise _bad("param payload[message_id] is required")
            if action == "react" and not payload.get("reaction"):
                raise _bad("param payload[reaction] is required")
    else:
        _validate_message(body["message"])
    messaging_type = body.get("messaging_type")
    if messaging_type is not None and messaging_type not in MESSAGING_TYPES:
        raise _bad("param messaging_type must be one of {MESSAGE_TAG, RESPONSE, UPDATE}")
    tag = body.get("tag")
    if messaging_type == "MESSAGE_TAG" and not tag:
        raise _bad("param tag is required when messaging_type is MESSAGE_TAG")
    if tag is not None and tag != "HUMAN_AGENT":
        raise _bad("param tag must be HUMAN_AGENT for Instagram messaging")
    reply_to = body.get("reply_to")
    if reply_to is not None and (not isinstance(reply_to, dict) or not reply_to.get("mid")):
        raise _bad("param reply_to[mid] is required")
    return str(recipient["id"]), tag == "HUMAN_AGENT"


def _sending_account(state: SandboxState, token: Token, node: str) -> Account:
    if token.flow == "facebook":
        if token.kind != "page":
            raise GraphError(
                210, "(#210) A page access token is required to request this resource."
            )
        if node not in ("me", token.page_id):
            raise errors.unsupported_request("POST", node)
        page = state.pages.get(token.page_id or "")
        account = state.accounts.get(page.ig_id or "") if page else None
    else:
        account = state.accounts.get(token.ig_id or "")
        if account is not None and node not in ("me", account.ig_id, account.app_scoped_id):
            raise errors.unsupported_request("POST", node)
    if account is None:
        raise GraphError(200, "(#200) The page has no Instagram professional account linked")
    return account


def _check_window(
    state: SandboxState, account: Account, igsid: str, tagged: bool, flow: Flow
) -> None:
    customer = state.customers.get(igsid)
    if customer is None or customer.account != account.ig_id:
        raise errors.no_matching_user()
    last = customer.last_inbound_at
    age = None if last is None else state.clock.now() - last
    if age is not None and age <= WINDOW_S:
        return
    if tagged and age is not None and age <= HUMAN_AGENT_WINDOW_S:
        return
    raise errors.outside_window(flow)


def _echo_message(body: dict[str, Any], mid: str) -> dict[str, Any]:
    message: dict[str, Any] = {"mid": mid}
    sent = body["message"]
    if "text" in sent:
        message["text"] = sent["text"]
    attachments = sent.get("attachments") or ([sent["attachment"]] if "attachment" in sent else [])
    if attachments:
        message["attachments"] = [
            {"type": str(a.get("type", "")).lower(), "payload": a.get("payload", {})}
            for a in attachments
        ]
    if "reply_to" in body:
        message["reply_to"] = body["reply_to"]
    message["is_echo"] = True
    return message


def _subscribed(state: SandboxState, account: Account) -> bool:
    return any(
        sub.account == account.ig_id and "messages" in sub.fields
        for sub in state.subscriptions.values()
    )


async def send_message(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    flow: Flow = "facebook" if request.path.startswith("/graph-facebook") else "instagram"
    raw = await request.text()
    record = SentRecord(
        id=state.next_id(),
        time_ms=state.clock.now_ms(),
        host="graph.facebook.com" if flow == "facebook" else "graph.instagram.com",
        path=request.path,
        account=None,
        page_id=None,
        raw=raw,
        body=None,
    )
    state.sent.append(record)
    try:
        record.body = parse_body(request.content_type, raw)
        params = dict(request.query)
        if isinstance(record.body, dict) and isinstance(record.body.get("access_token"), str):
            params.setdefault("access_token", record.body["access_token"])
        token = state.check_token(bearer_or_param(request, params), flow=flow)
        account = _sending_account(state, token, request.match_info["node"])
        record.account, record.page_id = account.ig_id, account.page_id
        injected(state, "send", account.ig_id, account.page_id)
        igsid, tagged = validate(record.body)
        _check_window(state, account, igsid, tagged, flow)
    except GraphError as error:
        response = graph_error_response(error)
        record.status, record.response = response.status, json.loads(response.text or "{}")
        return response
    body: dict[str, Any] = record.body
    result: dict[str, Any] = {"recipient_id": igsid}
    if "message" in body:
        mid = ids.message_id(account.ig_id)
        result["message_id"] = mid
        if _subscribed(state, account):
            item = {
                "sender": {"id": account.ig_id},
                "recipient": {"id": igsid},
                "timestamp": state.clock.now_ms(),
                "message": _echo_message(body, mid),
            }
            payload = envelope([entry(account.ig_id, state.clock.now_ms(), [item])])
            if state.echo_timing == "before":
                await request.app[SENDER].echo_first(payload, secret=secret_for(state, account))
            else:
                request.app[SENDER].echo(payload, secret=secret_for(state, account))
    record.status, record.response = 200, result
    usage = state.take_usage(account.ig_id)
    return web.json_response(result, headers=usage_headers(state, account.ig_id, usage=usage))


def add_routes(app: web.Application) -> None:
    for prefix in ("/graph-facebook", "/graph-instagram"):
        app.router.add_post(f"{prefix}/{VERSION}/{NODE}/messages", send_message)
        app.router.add_post(f"{prefix}/{NODE}/messages", send_message)
