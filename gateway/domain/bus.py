"""The Bus protocol: ordered, acknowledged delivery of events to consumer groups.

Two implementations: ``gateway.bus.redis`` (Redis Streams, many replicas) and
``gateway.bus.memory`` (in-process, the embedded default). Guarantees (DESIGN.md §4):

- every group receives every event (fan-out); consumers of one group share the load;
- at-least-once per group; ``Delivery.attempt`` grows on each redelivery;
- per ordering key (the conversation): the next event is not delivered to a group before
  the previous one is acked, or its ack deadline passes;
- an unacked delivery is redelivered after its deadline or when its consumer closes;
- a group that subscribes late receives the retained backlog.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from gateway.domain.events import Event, EventKind
from gateway.domain.store import OutboxEntry


@dataclass(frozen=True, slots=True)
class Subscription:
    group: str
    consumer: str
    # Empty = no filter. Events outside the filters are acked for this group silently.
    tenant_ids: frozenset[str] = field(default_factory=frozenset)
    channels: frozenset[str] = field(default_factory=frozenset)
    kinds: frozenset[EventKind] = field(default_factory=frozenset)
    max_in_flight: int = 64
    ack_deadline_s: float = 30.0

    def matches(self, event: Event) -> bool:
        return (
            (not self.tenant_ids or event.tenant_id in self.tenant_ids)
            and (not self.channels or event.channel in self.channels)
            and (not self.kinds or event.kind in self.kinds)
        )


@dataclass(frozen=True, slots=True)
class Delivery:
    delivery_id: str
    attempt: int
    event: Event


class Consumer(Protocol):
    """One consumer's session in a group; closing it releases its unacked deliveries."""

    async def receive(self, max_count: int, timeout_s: float) -> list[Delivery]:
        """Up to ``max_count`` deliveries (respecting max_in_flight); [] after ``timeout_s``."""

    async def ack(self, delivery_ids: Sequence[str]) -> None: ...
    async def nack(self, delivery_id: str, delay_s: float = 0.0) -> None: ...
    async def aclose(self) -> None: ...


class Bus(Protocol):
    backend: str  # "redis" or "memory"
    # Whether the bus itself keeps what it published for the retention window (Redis
    # streams do): the outbox then deletes an entry once it is published. The in-process
    # bus keeps False: the outbox is its log, rebuilt from there after a restart.
    keeps_events: bool

    async def start(self) -> None: ...
    async def aclose(self) -> None: ...
    async def ping(self) -> None:
        """Raises BusUnavailable unless the bus answers."""

    async def publish(self, events: Sequence[Event]) -> None:
        """Durably appends the events (one round trip for the batch)."""

    async def publish_outbox(self, entries: Sequence[OutboxEntry]) -> int | None:
        """Publishes outbox entries (the relay's path). The in-process bus keeps their
        ``seq`` to record acks in the store, which is what makes it durable. A bus that
        tells acks (:class:`AckWatermarks`) returns its clock (ms) at the last append, which
        its :attr:`Watermark.acked_before_ms` is compared with; any other returns None."""

    async def trim(self) -> int:
        """Drops events older than the retention window now (the bus also does it
        periodically); returns how many were dropped."""

    def subscribe(self, subscription: Subscription) -> AbstractAsyncContextManager[Consumer]: ...
    async def group_lag(self, group: str) -> int:
        """Events retained that the group has not acked yet."""


@dataclass(frozen=True, slots=True)
class Watermark:
    """What a bus that keeps its own events can tell of them, at one moment."""

    # The bus may have lost what it held since it was last asked (restarted without its
    # data, failed over, flushed): what was published to it must be published again.
    lost: bool
    # Everything appended before this (the bus's clock, ms) was acked by every group that
    # exists; None: nothing can be said (a group is missing somewhere, or ``lost``).
    acked_before_ms: int | None


@runtime_checkable
class AckWatermarks(Protocol):
    """A bus that keeps the events it published for its groups (Redis) and can tell when
    every group acked them: until then the outbox keeps them too (``OutboxRelay``), since
    such a bus may lose what it holds."""

    async def watermark(self) -> Watermark: ...
    async def recovered(self) -> None:
        """The loss the last ``watermark`` reported was answered: what the outbox held was
        made to be published again. Until then every ``watermark`` reports the loss."""
