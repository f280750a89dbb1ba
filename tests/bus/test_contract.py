"""The Bus contract (DESIGN.md §4), run against the in-process and the Redis bus."""

from __future__ import annotations

import asyncio

from gateway.domain.bus import Consumer, Delivery, Subscription
from gateway.domain.events import EventKind
from tests.bus.conftest import Harness, OrderCheck, make_event


def sub(group: str, consumer: str = "c1", **kwargs: object) -> Subscription:
    return Subscription(group=group, consumer=consumer, **kwargs)  # type: ignore[arg-type]


async def drain(
    consumer: Consumer,
    count: int,
    *,
    ack: bool = True,
    timeout: float = 5.0,  # noqa: ASYNC109
) -> list[Delivery]:
    """Receives until ``count`` deliveries arrived (or ``timeout``), acking as it goes."""
    got: list[Delivery] = []
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    while len(got) < count and loop.time() < give_up:
        batch = await consumer.receive(100, 0.2)
        got.extend(batch)
        if ack and batch:
            await consumer.ack([d.delivery_id for d in batch])
    return got


async def test_every_group_receives_every_event(harness: Harness) -> None:
    bus = harness.bus
    async with bus.subscribe(sub("g1")) as c1, bus.subscribe(sub("g2")) as c2:
        events = [make_event(f"conv{i % 7}", i) for i in range(40)]
        await harness.publish(events)
        got1, got2 = await asyncio.gather(drain(c1, 40), drain(c2, 40))
    want = {e.event_id for e in events}
    assert {d.event.event_id for d in got1} == want
    assert {d.event.event_id for d in got2} == want
    assert len(got1) == len(got2) == 40


async def test_consumers_of_one_group_share_the_load(harness: Harness) -> None:
    bus = harness.bus
    async with bus.subscribe(sub("g", "a")) as a, bus.subscribe(sub("g", "b")) as b:
        await harness.settle()
        events = [make_event(f"conv{i % 40}", i) for i in range(400)]
        await harness.publish(events)
        got_a: list[Delivery] = []
        got_b: list[Delivery] = []

        async def run(consumer: Consumer, out: list[Delivery]) -> None:
            loop = asyncio.get_running_loop()
            give_up = loop.time() + 5
            while len(got_a) + len(got_b) < 400 and loop.time() < give_up:
                batch = await consumer.receive(10, 0.1)
                out.extend(batch)
                await asyncio.sleep(0.001 * len(batch))  # both must get a turn
                if batch:
                    await consumer.ack([d.delivery_id for d in batch])

        await asyncio.gather(run(a, got_a), run(b, got_b))
    ids = [d.event.event_id for d in got_a + got_b]
    assert sorted(ids) == sorted(e.event_id for e in events)
    assert got_a
    assert got_b


async def test_each_conversation_is_delivered_in_order_one_at_a_time(harness: Harness) -> None:
    bus = harness.bus
    conversations, per_conversation = 50, 20
    events = [
        make_event(f"conv{c}", n) for n in range(per_conversation) for c in range(conversations)
    ]
    check = OrderCheck(len(events), seed=7)

    subs = [sub("g", name, max_in_flight=40, ack_deadline_s=30.0) for name in ("a", "b")]
    async with bus.subscribe(subs[0]) as a, bus.subscribe(subs[1]) as b:
        await harness.settle()
        await harness.publish(events)
        await asyncio.gather(check.run("a", a), check.run("b", b))
    assert check.violations == []
    assert check.acked == len(events)
    assert all(n == per_conversation for n in check.next_expected.values())
    assert await bus.group_lag("g") == 0


async def test_an_unacked_delivery_comes_again_after_its_deadline(harness: Harness) -> None:
    bus = harness.bus
    first = make_event("conv1", 0)
    second = make_event("conv1", 1)
    await harness.publish([first, second])
    async with bus.subscribe(sub("g", ack_deadline_s=0.3)) as c:
        [d1] = await c.receive(10, 2.0)
        assert (d1.event.event_id, d1.attempt) == (first.event_id, 1)
        # The conversation's next event waits behind the unacked one.
        assert await c.receive(10, 0.1) == []
        [again] = await c.receive(10, 2.0)
        assert again.event.event_id == first.event_id
        assert again.attempt == 2
        await c.ack([again.delivery_id])
        [d2] = await c.receive(10, 2.0)
        assert d2.event.event_id == second.event_id


async def test_only_the_unacked_deliveries_of_a_batch_come_again(harness: Harness) -> None:
    bus = harness.bus
    events = [make_event(f"conv{i}", 0) for i in range(4)]
    await harness.publish(events)
    async with bus.subscribe(sub("g", ack_deadline_s=0.3)) as c:
        batch = await drain(c, 4, ack=False)
        assert len(batch) == 4
        kept, acked = batch[:1], batch[1:]
        await c.ack([d.delivery_id for d in acked])
        again = await drain(c, 2, timeout=1.5)
    assert [(d.event.event_id, d.attempt) for d in again] == [(kept[0].event.event_id, 2)]


async def test_a_departed_consumers_deliveries_go_to_another(harness: Harness) -> None:
    bus = harness.bus
    events = [make_event(f"conv{i}", 0) for i in range(5)]
    await harness.publish(events)
    async with bus.subscribe(sub("g", "a", ack_deadline_s=30.0)) as a:
        taken = await drain(a, 5, ack=False)
        async with bus.subscribe(sub("g", "b", ack_deadline_s=30.0)) as b:
            await a.aclose()  # disconnects with five deliveries unacked
            got = await drain(b, 5, timeout=5.0)
    assert len(taken) == 5
    assert sorted(d.event.event_id for d in got) == sorted(e.event_id for e in events)
    assert all(d.attempt == 2 for d in got)


async def test_a_nacked_delivery_comes_again_after_the_delay(harness: Harness) -> None:
    bus = harness.bus
    first, second = make_event("conv1", 0), make_event("conv1", 1)
    await harness.publish([first, second])
    async with bus.subscribe(sub("g", ack_deadline_s=30.0)) as c:
        [d1] = await c.receive(10, 2.0)
        loop = asyncio.get_running_loop()
        nacked_at = loop.time()
        await c.nack(d1.delivery_id, 0.3)
        assert await c.receive(10, 0.1) == []  # not before the delay, nor the next one
        [again] = await c.receive(10, 2.0)
        assert loop.time() - nacked_at >= 0.29
        assert (again.event.event_id, again.attempt) == (first.event_id, 2)
        await c.nack(again.delivery_id)  # no delay: at once
        [third] = await c.receive(10, 1.0)
        assert (third.event.event_id, third.attempt) == (first.event_id, 3)
        await c.ack([third.delivery_id])
        [d2] = await c.receive(10, 2.0)
        assert d2.event.event_id == second.event_id


async def test_a_late_group_receives_the_retained_backlog(harness: Harness) -> None:
    bus = harness.bus
    async with bus.subscribe(sub("early")) as early:
        events = [make_event(f"conv{i % 3}", i) for i in range(30)]
        await harness.publish(events)
        await drain(early, 30)
    assert await bus.group_lag("late") == 30
    async with bus.subscribe(sub("late")) as late:
        got = await drain(late, 30)
    assert [d.event.event_id for d in got if d.event.conversation_id == "conv0"] == [
        e.event_id for e in events if e.conversation_id == "conv0"
    ]
    assert len(got) == 30
    assert await bus.group_lag("late") == 0


async def test_filters_select_tenants_channels_and_kinds(harness: Harness) -> None:
    bus = harness.bus
    wanted = make_event("c1", 0, tenant="t1", channel="instagram")
    others = [
        make_event("c2", 0, tenant="t2", channel="instagram"),
        make_event("c3", 0, tenant="t1", channel="messenger"),
        make_event("c4", 0, tenant="t1", channel="instagram", kind=EventKind.POSTBACK),
    ]
    await harness.publish([*others, wanted])
    subscription = sub(
        "g",
        tenant_ids=frozenset({"t1"}),
        channels=frozenset({"instagram"}),
        kinds=frozenset({EventKind.MESSAGE_RECEIVED}),
    )
    async with bus.subscribe(subscription) as c:
        got = await drain(c, 1)
        assert await c.receive(10, 0.2) == []
    assert [d.event.event_id for d in got] == [wanted.event_id]
    assert await bus.group_lag("g") == 0  # filtered events count as handled


async def test_max_in_flight_is_respected(harness: Harness) -> None:
    bus = harness.bus
    await harness.publish([make_event(f"conv{i}", 0) for i in range(10)])
    async with bus.subscribe(sub("g", max_in_flight=3)) as c:
        first = await c.receive(10, 2.0)
        while len(first) < 3:
            first += await c.receive(10, 1.0)
        assert len(first) == 3
        assert await c.receive(10, 0.2) == []
        await c.ack([first[0].delivery_id])
        more = await c.receive(10, 2.0)
        assert len(more) == 1


async def test_group_lag_counts_events_not_acked(harness: Harness) -> None:
    bus = harness.bus
    async with bus.subscribe(sub("g", max_in_flight=4)) as c:
        await harness.publish([make_event(f"conv{i}", 0) for i in range(10)])
        got = await drain(c, 4, ack=False)
        assert await bus.group_lag("g") == 10
        await c.ack([d.delivery_id for d in got])
        assert await bus.group_lag("g") == 6


async def test_trimming_drops_events_past_retention(harness: Harness) -> None:
    await harness.close()
    bus = await harness.open(retention_s=0.5)
    old = [make_event(f"conv{i}", 0) for i in range(5)]
    await harness.publish(old)
    await asyncio.sleep(0.6)
    new = [make_event(f"conv{i}", 1) for i in range(5)]
    await harness.publish(new)
    assert await bus.trim() == 5
    async with bus.subscribe(sub("late")) as c:
        got = await drain(c, 5)
        assert await c.receive(10, 0.2) == []
    assert sorted(d.event.event_id for d in got) == sorted(e.event_id for e in new)


async def test_unacked_events_survive_a_restart(harness: Harness) -> None:
    events = [make_event(f"conv{i % 4}", i // 4) for i in range(12)]
    await harness.publish(events)
    async with harness.bus.subscribe(sub("g")) as c:
        heads = await drain(c, 4, ack=False)
        await c.ack([d.delivery_id for d in heads[:2]])
    assert len(heads) == 4
    bus = await harness.reopen()
    async with bus.subscribe(sub("g")) as c:
        again = await drain(c, 10)
        assert await c.receive(10, 0.2) == []
    want = {e.event_id for e in events} - {d.event.event_id for d in heads[:2]}
    assert sorted(d.event.event_id for d in again) == sorted(want)
    # Those delivered before the restart come as their second attempt, the others as new.
    redelivered = {d.event.event_id for d in heads[2:]}
    assert {d.event.event_id: d.attempt for d in again} == {
        event_id: 2 if event_id in redelivered else 1 for event_id in want
    }


async def test_entries_never_handed_out_come_first_as_attempt_one(harness: Harness) -> None:
    """A consumer that leaves with one delivery unacked and the rest of the conversation
    still held back: only the unacked one is a redelivery for the next consumer."""
    bus = harness.bus
    events = [make_event("conv1", n) for n in range(4)]
    await harness.publish(events)
    async with bus.subscribe(sub("g", "a", ack_deadline_s=30.0)) as a:
        [first] = await drain(a, 1, ack=False)
        await asyncio.sleep(0.2)  # the rest is read, held back behind the first
    async with bus.subscribe(sub("g", "b", ack_deadline_s=30.0)) as b:
        got = await drain(b, 4, timeout=5.0)
    assert first.event.event_id == events[0].event_id
    assert [(d.event.event_id, d.attempt) for d in got] == [
        (events[0].event_id, 2),
        *((e.event_id, 1) for e in events[1:]),
    ]


async def test_a_redelivery_let_go_before_it_was_handed_out_stays_a_redelivery(
    harness: Harness,
) -> None:
    """A consumer that takes a departed one's unacked delivery over (held back, ready to go
    out again) and leaves before handing it out: for the next consumer it is still a
    redelivery, not a first delivery."""
    bus = harness.bus
    event = make_event("conv1", 0)
    await harness.publish([event])
    async with bus.subscribe(sub("g", "a", ack_deadline_s=30.0)) as a:
        [first] = await drain(a, 1, ack=False)
    async with bus.subscribe(sub("g", "b", ack_deadline_s=30.0)):
        pass  # b claims it as it starts, to hand out next, and leaves before it does
    async with bus.subscribe(sub("g", "c", ack_deadline_s=30.0)) as c:
        got = await drain(c, 1, timeout=5.0)
    assert (first.event.event_id, first.attempt) == (event.event_id, 1)
    assert [(d.event.event_id, d.attempt) for d in got] == [(event.event_id, 2)]
