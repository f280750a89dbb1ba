"""The Instagram channel plugin (registered as ``instagram`` in ``switchboard.channels``)."""

from channels.instagram.plugin import InstagramChannel
from channels.instagram.settings import InstagramSettings

__all__ = ["InstagramChannel", "InstagramSettings"]
