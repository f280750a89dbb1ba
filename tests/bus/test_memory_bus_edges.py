"""The in-process bus at the edges of the Bus contract (DESIGN.md §4), as the Redis bus
behaves: malformed and stale delivery ids, a restart's delivery ids and retention."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.domain.bus import Subscription
from gateway.domain.errors import InvalidArgument
from tests.bus.conftest import Harness, make_event
from tests.bus.test_contract import drain


def sub(group: str, consumer: str = "c1", **kwargs: object) -> Subscription:
    return Subscription(group=group, consumer=consumer, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def mem(tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness("memory", tmp_path / "bus.db", "", "")
    await h.open()
    try:
        yield h
    finally:
        await h.close()


# ---- an ack refused for a malformed id acks nothing (as on the Redis bus) ----


async def test_an_ack_refused_for_a_malformed_id_acks_and_releases_nothing(
    mem: Harness,
) -> None:
    first, second = make_event("conv1", 0), make_event("conv1", 1)
    await mem.publish([first, second])
    async with mem.bus.subscribe(sub("g")) as c:
        [d1] = await c.receive(10, 2.0)
        with pytest.raises(InvalidArgument):
            await c.ack([d1.delivery_id, "not-a-delivery-id"])
        # The ack was refused: d1 is still in flight, its conversation still held.
        assert await c.receive(10, 0.3) == []
        assert await mem.bus.group_lag("g") == 2


@pytest.mark.parametrize("shape", ["{epoch}", "{epoch}.x", " {id}", "{id}.9", "{epoch}.0.1"])
async def test_a_malformed_delivery_id_is_invalid_argument(mem: Harness, shape: str) -> None:
    # messaging.proto: "a malformed delivery_id in an ack or nack" is INVALID_ARGUMENT.
    await mem.publish([make_event("conv1", 0), make_event("conv1", 1)])
    async with mem.bus.subscribe(sub("g")) as c:
        [d1] = await c.receive(10, 2.0)
        epoch = d1.delivery_id.split(".")[0]
        with pytest.raises(InvalidArgument):
            await c.ack([shape.format(epoch=epoch, id=d1.delivery_id)])
        assert await mem.bus.group_lag("g") == 2


# ---- a delivery id made before a restart names nothing after it ----


async def test_an_ack_of_a_delivery_made_before_a_restart_does_not_ack_another_event(
    tmp_path: Path,
) -> None:
    h = Harness("memory", tmp_path / "bus.db", "", "")
    await h.open(retention_s=1.0)
    try:
        x = make_event("conv0", 0)
        await h.publish([x])
        async with h.bus.subscribe(sub("g")) as c:
            assert len(await drain(c, 1)) == 1  # acked
        await asyncio.sleep(1.2)  # x leaves the retention window
        y, z = make_event("conv1", 0), make_event("conv2", 0)
        await h.publish([y, z])
        async with h.bus.subscribe(sub("g", ack_deadline_s=30.0)) as c:
            before = {d.event.event_id: d for d in await drain(c, 2, ack=False)}
        # The process restarts; the client finished y and acks it with the id it got.
        await h.reopen()
        async with h.bus.subscribe(sub("g", ack_deadline_s=30.0)) as c:
            after = {d.event.event_id: d for d in await drain(c, 2, ack=False)}
            assert set(after) == {y.event_id, z.event_id}
            await c.ack([before[y.event_id].delivery_id, after[y.event_id].delivery_id])
            # z was never acked, under any id: it is still the group's to handle.
            assert await h.bus.group_lag("g") == 1
    finally:
        await h.close()


# ---- retention runs from publication, across a restart ----


async def test_trimming_after_a_restart_drops_events_past_retention(tmp_path: Path) -> None:
    h = Harness("memory", tmp_path / "bus.db", "", "")
    bus = await h.open(retention_s=1.0)
    try:
        old = [make_event(f"conv{i}", 0) for i in range(5)]
        await h.publish(old)
        await asyncio.sleep(0.6)
        bus = await h.reopen()  # still within retention: the old events are reloaded
        await asyncio.sleep(0.6)  # now 1.2 s past their publication
        new = [make_event(f"conv{i}", 1) for i in range(5)]
        await h.publish(new)
        assert await bus.trim() == 5
        async with bus.subscribe(sub("late")) as c:
            got = await drain(c, 10, timeout=1.5)
        assert sorted(d.event.event_id for d in got) == sorted(e.event_id for e in new)
    finally:
        await h.close()


# ---- a stale nack takes nothing from the consumer that holds the delivery now ----


async def test_a_stale_nack_does_not_take_the_delivery_another_consumer_holds(
    mem: Harness,
) -> None:
    event = make_event("conv1", 0)
    await mem.publish([event])
    bus = mem.bus
    async with (
        bus.subscribe(sub("g", "a", ack_deadline_s=0.3)) as a,
        bus.subscribe(sub("g", "b", ack_deadline_s=30.0)) as b,
    ):
        [da] = await a.receive(10, 2.0)
        await asyncio.sleep(0.4)  # a is slow: its deadline passes
        [db] = await b.receive(10, 2.0)
        assert (db.event.event_id, db.attempt) == (event.event_id, 2)
        # a gives up on its (superseded) delivery; b is still working on its own.
        await a.nack(da.delivery_id, 0.3)
        await b.ack([db.delivery_id])  # b is done: the event is handled
        again = await b.receive(10, 1.0) + await a.receive(10, 0.2)
        assert [(d.event.event_id, d.attempt) for d in again] == []
        assert await bus.group_lag("g") == 0
