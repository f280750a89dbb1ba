"""The channel registry: plugins found under the entry-point group ``switchboard.channels``.

An installed package adds a channel by declaring, in its own pyproject::

    [project.entry-points."switchboard.channels"]
    telegram = "switchboard_telegram:TelegramChannel"
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from importlib.metadata import EntryPoint, entry_points

from gateway.domain.channel import ChannelContext, ChannelPlugin
from gateway.domain.errors import ConfigError, NotFound

ENTRY_POINT_GROUP = "switchboard.channels"

log = logging.getLogger(__name__)


class ChannelRegistry(Mapping[str, ChannelPlugin]):
    """The channel plugins of this process, by name."""

    def __init__(self, plugins: Iterable[ChannelPlugin]) -> None:
        self._plugins = {p.name: p for p in plugins}

    def __getitem__(self, name: str) -> ChannelPlugin:
        return self._plugins[name]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._plugins))

    def __len__(self) -> int:
        return len(self._plugins)

    def require(self, name: str) -> ChannelPlugin:
        plugin = self._plugins.get(name)
        if plugin is None:
            raise NotFound(
                f"no channel named {name!r} is installed",
                reason="CHANNEL_NOT_FOUND",
                metadata={"channel": name},
            )
        return plugin

    async def start(self) -> None:
        for plugin in self._plugins.values():
            await plugin.start()

    async def aclose(self) -> None:
        for plugin in self._plugins.values():
            await plugin.aclose()


def load_channels(
    context: ChannelContext, eps: Iterable[EntryPoint] | None = None
) -> ChannelRegistry:
    """Builds every registered plugin; a plugin that fails to load stops the start."""
    plugins: list[ChannelPlugin] = []
    problems: list[str] = []
    found = entry_points(group=ENTRY_POINT_GROUP) if eps is None else eps
    for ep in found:
        try:
            cls = ep.load()
        except (ImportError, AttributeError) as exc:
            problems.append(f"channel plugin {ep.name!r} ({ep.value}) does not load: {exc}")
            continue
        try:
            plugins.append(cls.create(context))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return ChannelRegistry(plugins)
