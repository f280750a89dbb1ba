"""Customer profiles from the Graph API (INSTAGRAM.md §5), for background enrichment."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from channels.instagram.graph_client import GraphClient
from channels.instagram.settings import FLOW_FACEBOOK, InstagramSettings
from gateway.config import Secret
from gateway.domain.errors import ChannelRequestError
from gateway.domain.inbound import Profile
from gateway.domain.models import Connection

FIELDS = "name,username,profile_pic"


class InstagramProfiles:
    """Implements :class:`gateway.domain.inbound.ProfileSource` on the plugin's Graph client."""

    def __init__(self, settings: Callable[[], InstagramSettings], graph: GraphClient) -> None:
        self._settings = settings
        self._graph = graph

    async def fetch_profile(
        self, connection: Connection, access_token: str, channel_user_id: str
    ) -> Profile:
        if not channel_user_id.isdigit():
            raise ChannelRequestError("not an Instagram-scoped user id")
        host = (
            "INSTAGRAM_GRAPH_FACEBOOK_URL"
            if connection.login_flow == FLOW_FACEBOOK
            else "INSTAGRAM_GRAPH_URL"
        )
        data = await self._graph.request(
            "GET",
            host,
            f"/{self._settings().graph_version}/{channel_user_id}",
            params={"fields": FIELDS},
            token=Secret(access_token),
        )
        return Profile(
            username=_text(data.get("username")),
            name=_text(data.get("name")),
            picture_url=_text(data.get("profile_pic")),
        )


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""
