"""On Redis, the outbox keeps what the relay published until every group acked it, and
publishes it again when Redis lost it: losing Redis delays delivery, never loses an event
(DESIGN.md §1)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from gateway.bus import RedisBus
from gateway.domain.bus import Consumer, Subscription
from gateway.domain.events import Event, EventKind
from gateway.services.outbox import OutboxWriter
from gateway.services.relay import OutboxRelay
from gateway.store import SqliteStore
from tests.bus.conftest import make_event
from tests.helpers import RedisNode, redis_node


def _outbox(db: Path) -> dict[str, tuple[bool, bool]]:
    """event_id -> (published, held), of every entry the outbox keeps."""
    with sqlite3.connect(db) as conn:
        found = conn.execute("SELECT event_id, published_at IS NOT NULL, held FROM outbox")
        return {row[0]: (bool(row[1]), bool(row[2])) for row in found}


async def _until(check: Callable[[], bool], within_s: float = 10.0) -> None:
    async with asyncio.timeout(within_s):
        while not check():  # noqa: ASYNC110 - the relay's own task moves things on
            await asyncio.sleep(0.02)


async def _take(consumer: Consumer, count: int) -> list[Event]:
    got: list[Event] = []
    async with asyncio.timeout(15):
        while len(got) < count:
            deliveries = await consumer.receive(count, 1.0)
            await consumer.ack([d.delivery_id for d in deliveries])
            got += [d.event for d in deliveries]
    return got


async def _hand_over(rig: _Rig, events: list[Event]) -> None:
    async with rig.store.transaction() as tx:
        handed = await rig.writer.add(tx, events)
    rig.writer.committed(handed)


@dataclass
class _Rig:
    db: Path
    node: RedisNode
    store: SqliteStore
    bus: RedisBus
    relay: OutboxRelay
    writer: OutboxWriter


@asynccontextmanager
async def _rig(tmp_path: Path, *, hold_s: float, sweep_s: float = 0.1) -> AsyncIterator[_Rig]:
    """A relay on SQLite and a Redis of its own, with a group "ai" nobody reads yet."""
    db = tmp_path / "relay.db"
    with redis_node() as node:
        async with SqliteStore(str(db)) as store, RedisBus(node.url, shards=4) as bus:
            await store.migrate()
            await bus.ensure_group("ai")
            relay = OutboxRelay(store, bus, sweep_interval_s=sweep_s, hold_s=hold_s)
            yield _Rig(db, node, store, bus, relay, OutboxWriter(relay))


async def test_entries_are_held_until_every_group_acked_then_let_go(tmp_path: Path) -> None:
    message = make_event("conv1", 0)
    reaction = make_event("conv2", 0, kind=EventKind.REACTION_CHANGED)
    async with _rig(tmp_path, hold_s=0.3) as rig, rig.relay:
        await _hand_over(rig, [message, reaction])
        # Nobody read them: past hold_s they are held in the store.
        both_held = {message.event_id: (True, True), reaction.event_id: (True, True)}
        await _until(lambda: _outbox(rig.db) == both_held)
        async with rig.bus.subscribe(Subscription(group="ai", consumer="c1")) as ai:
            taken = {e.event_id for e in await _take(ai, 2)}
            assert taken == {message.event_id, reaction.event_id}
            # Acked by the only group: the message goes, the reaction stays (unheld) to
            # refuse Meta's repeats.
            await _until(lambda: _outbox(rig.db) == {reaction.event_id: (True, False)})
            # One acked in memory, before it was ever held, goes at once.
            later = make_event("conv3", 0)
            await _hand_over(rig, [later])
            assert [e.event_id for e in await _take(ai, 1)] == [later.event_id]
            await _until(lambda: later.event_id not in _outbox(rig.db), within_s=2.0)


async def test_what_redis_lost_is_published_again_held_or_in_memory(tmp_path: Path) -> None:
    """Two entries held in the store and one waiting in memory when Redis restarts empty:
    the relay sees the loss, makes the group again and publishes all three again, the
    store's first; the group's consumer gets each of them."""
    held = [make_event("conv1", 0), make_event("conv1", 1)]
    waiting = make_event("conv2", 0)
    async with _rig(tmp_path, hold_s=0.5) as rig, rig.relay:
        await _hand_over(rig, held)
        await _until(lambda: all(h for _, h in _outbox(rig.db).values()))
        rig.relay._hold_s = 60.0  # this one waits in memory
        await _hand_over(rig, [waiting])
        await _until(lambda: rig.relay.published == 3)
        assert _outbox(rig.db)[waiting.event_id] == (False, False)  # claimed, in memory
        rig.node.stop()
        rig.node.start()
        await _until(lambda: rig.relay.published >= 6, within_s=15)
        async with rig.bus.subscribe(Subscription(group="ai", consumer="c1")) as ai:
            got = await _take(ai, 3)
        in_conv1 = [e.event_id for e in got if e.conversation_id == "conv1"]
        assert in_conv1 == [e.event_id for e in held]
        assert {e.event_id for e in got} == {e.event_id for e in [*held, waiting]}
        await _until(lambda: _outbox(rig.db) == {}, within_s=5)


async def test_what_redis_lost_goes_out_again_before_anything_newer_of_its_conversation(
    tmp_path: Path,
) -> None:
    """Redis comes back empty while the relay waits on an event it published; the next
    event of that conversation is committed before the relay has looked at Redis again.
    Redis refuses that append (its markers are gone), and the relay publishes the lost
    one first: the conversation's order holds."""
    lost, newer = make_event("conv1", 0), make_event("conv1", 1)
    # No sweep (and so no look of its own) during the test: only the refusal tells.
    async with _rig(tmp_path, hold_s=60.0, sweep_s=60.0) as rig, rig.relay:
        await _hand_over(rig, [lost])
        await _until(lambda: rig.relay.published == 1)
        rig.node.stop()
        rig.node.start()
        await _hand_over(rig, [newer])
        await _until(lambda: rig.relay.published >= 3, within_s=15)
        async with rig.bus.subscribe(Subscription(group="ai", consumer="c1")) as ai:
            got = await _take(ai, 2)
        assert [e.event_id for e in got] == [lost.event_id, newer.event_id]
