"""Meta-shaped webhook payloads (INSTAGRAM.md §2-3), one per kind, for the tests."""

from __future__ import annotations

from typing import Any

IG_ID = "17841400000000001"
PAGE_ID = "104000000000001"
IGSID = "5200000000000001"
TS = 1_700_000_000_000


def envelope(
    *items: dict[str, Any], account: str = IG_ID, key: str = "messaging"
) -> dict[str, Any]:
    return {"object": "instagram", "entry": [{"id": account, "time": TS, key: list(items)}]}


def inbound(body: dict[str, Any], *, ts: int = TS, sender: str = IGSID) -> dict[str, Any]:
    return {"sender": {"id": sender}, "recipient": {"id": IG_ID}, "timestamp": ts, **body}


def samples() -> dict[str, dict[str, Any]]:
    """A messaging item per kind, named by what it exercises."""
    return {
        "text": inbound({"message": {"mid": "m-text", "text": "Hi ✨"}}),
        "attachments": inbound(
            {
                "message": {
                    "mid": "m-att",
                    "attachments": [
                        {"type": t, "payload": {"url": f"https://cdn.example/{t}"}}
                        for t in (
                            "image",
                            "video",
                            "audio",
                            "file",
                            "media",
                            "story_mention",
                            "reel",
                            "ig_reel",
                            "ig_story",
                            "template",
                            "fallback",
                        )
                    ]
                    + [
                        {"type": "ephemeral", "payload": {}},
                        {
                            "type": "share",
                            "payload": {"url": "https://ig/p/1", "title": "Look"},
                        },
                        {
                            "type": "ig_post",
                            "payload": {
                                "url": "https://ig/p/1",
                                "title": "Look",
                                "ig_post_media_id": "18000000001",
                            },
                        },
                        {"type": "hologram"},
                    ],
                }
            }
        ),
        "reply_to_message": inbound(
            {"message": {"mid": "m-reply", "text": "yes", "reply_to": {"mid": "m-text"}}}
        ),
        "reply_to_story": inbound(
            {
                "message": {
                    "mid": "m-story",
                    "text": "nice",
                    "reply_to": {
                        "story": {
                            "url": "https://cdn/s.mp4",
                            "id": "st-1",
                            "link_sticker_url": "https://shop.example/sale",
                        }
                    },
                }
            }
        ),
        "quick_reply": inbound(
            {"message": {"mid": "m-qr", "text": "Red", "quick_reply": {"payload": "COLOR_RED"}}}
        ),
        "ads_referral": inbound(
            {
                "message": {
                    "mid": "m-ad",
                    "text": "Is it in stock?",
                    "referral": {
                        "ref": "summer",
                        "ad_id": "6000000001",
                        "source": "ADS",
                        "type": "OPEN_THREAD",
                        "ads_context_data": {"ad_title": "Summer", "photo_url": "https://x"},
                    },
                }
            }
        ),
        "shop_referral": inbound(
            {
                "message": {
                    "mid": "m-shop",
                    "text": "this one",
                    "referral": {"product": {"id": "prod-1"}, "source": "SHOPS"},
                }
            }
        ),
        "echo": {
            "sender": {"id": IG_ID},
            "recipient": {"id": IGSID},
            "timestamp": TS,
            "message": {"mid": "m-echo", "text": "Thanks!", "is_echo": True},
        },
        "self": {
            "sender": {"id": IG_ID},
            "recipient": {"id": IG_ID},
            "timestamp": TS,
            "message": {"mid": "m-self", "text": "note", "is_self": True},
        },
        "unsend": inbound({"message": {"mid": "m-text", "is_deleted": True}}),
        "edit": inbound({"message_edit": {"mid": "m-text", "text": "Hi!", "num_edit": "1"}}),
        "react": inbound(
            {"reaction": {"mid": "m-text", "action": "react", "reaction": "love", "emoji": "❤️"}}
        ),
        "unreact": inbound({"reaction": {"mid": "m-text", "action": "unreact"}}),
        "read": inbound({"read": {"mid": "m-text"}}),
        "postback": inbound(
            {"postback": {"mid": "m-pb", "title": "Get started", "payload": "GET_STARTED"}}
        ),
        "igme_referral": inbound(
            {"referral": {"ref": "promo", "source": "SHORTLINK", "type": "OPEN_THREAD"}}
        ),
        "unsupported": inbound({"message": {"mid": "m-uns", "is_unsupported": True}}),
        "unknown": inbound({"optin": {"type": "notification_messages", "payload": "x"}}),
    }
