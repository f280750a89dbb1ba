"""The Redis bus on a real Redis Cluster (three primaries): what a cluster changes.

The contract suite runs on the cluster too (the ``redis-cluster`` harness); these tests
add what only a cluster shows: shard streams on different nodes read by one blocking
reader per slot, every shard in use at once, no ``COMMAND GETKEYS`` round trip per read,
and the ``redis+cluster://`` URL from the configuration to the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ClusterCrossSlotError

from gateway.bus import RedisBus
from gateway.domain.bus import Subscription
from gateway.domain.errors import BusUnavailable
from gateway.domain.events import Event
from gateway.redis_client import open_redis, redis_url_problem
from gateway.security.keyring import generate_key_spec
from tests.bus.conftest import OrderCheck, make_event
from tests.bus.test_contract import drain
from tests.cli.test_cli import switchboard
from tests.helpers import free_port

SHARDS = 16


@contextlib.asynccontextmanager
async def cluster_bus(url: str, *, lease_ttl_s: float) -> AsyncIterator[RedisBus]:
    """A started bus of SHARDS shards on the cluster at ``url``, under a fresh prefix."""
    bus = RedisBus(
        url,
        key_prefix=f"sbtest:{secrets.token_hex(4)}:",
        shards=SHARDS,
        lease_ttl_s=lease_ttl_s,
        block_ms=100,
    )
    await bus.start()
    try:
        yield bus
    finally:
        await bus.aclose()


@pytest.fixture
async def bus(redis_cluster_url: str) -> AsyncIterator[RedisBus]:
    async with cluster_bus(redis_cluster_url, lease_ttl_s=0.4) as bus:
        yield bus


def conversations_on_every_shard(bus: RedisBus, per_shard: int) -> list[str]:
    """Conversation ids, ``per_shard`` of them landing on each shard."""
    by_shard: dict[int, list[str]] = defaultdict(list)
    n = 0
    while min((len(by_shard[s]) for s in range(SHARDS)), default=0) < per_shard:
        conversation = f"conv{n}"
        n += 1
        shard = bus.keys.shard_of(conversation)
        if len(by_shard[shard]) < per_shard:
            by_shard[shard].append(conversation)
    return [c for s in range(SHARDS) for c in by_shard[s]]


def command_calls(url: str, command: str) -> int:
    """How many times the whole cluster ran ``command`` (from INFO commandstats)."""
    client = redis.RedisCluster.from_url(url.replace("redis+cluster://", "redis://"))
    try:
        total = 0
        for node in client.get_primaries():
            stats = client.info("commandstats", target_nodes=node)
            total += int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))
        return total
    finally:
        client.close()


async def test_the_shard_streams_live_on_several_nodes_which_refuse_a_cross_slot_read(
    bus: RedisBus,
) -> None:
    client = bus.client
    assert isinstance(client, RedisCluster)
    assert bus.cluster
    assert len(bus.read_groups()) == SHARDS  # one reader per slot: no two shards share one
    streams = [bus.keys.stream(s) for s in range(SHARDS)]
    nodes = {client.get_node_from_key(stream).name for stream in streams}
    assert len(nodes) >= 2
    await bus.ensure_group("g")
    # What the single-node path sends: one XREADGROUP naming every stream.
    node = client.get_node_from_key(streams[0])
    with pytest.raises(ClusterCrossSlotError):  # the server's CROSSSLOT reply
        await client.execute_command(
            "XREADGROUP", "GROUP", "g", "c", "STREAMS", *streams, *[">"] * SHARDS, target_nodes=node
        )


async def test_every_shard_delivers_each_conversation_in_order_across_two_consumers(
    bus: RedisBus,
) -> None:
    conversations = conversations_on_every_shard(bus, per_shard=3)
    per_conversation = 8
    events = [make_event(c, n) for n in range(per_conversation) for c in conversations]
    assert {bus.keys.shard_of(e.ordering_key) for e in events} == set(range(SHARDS))
    check = OrderCheck(len(events), seed=11)

    subs = [Subscription("g", name, max_in_flight=40, ack_deadline_s=30.0) for name in "ab"]
    async with bus.subscribe(subs[0]) as a, bus.subscribe(subs[1]) as b:
        await asyncio.sleep(0.6)  # both members see each other and split the shards
        for start in range(0, len(events), 100):
            await bus.publish(events[start : start + 100])
        await asyncio.gather(check.run("a", a), check.run("b", b))
    assert check.violations == []
    assert check.acked == len(events)
    assert all(check.next_expected[c] == per_conversation for c in conversations)
    received = {
        name: {bus.keys.shard_of(d.event.ordering_key) for d in check.received[name]}
        for name in "ab"
    }
    # The group's shards were split: each consumer read its own share, all 16 between them.
    assert received["a"]
    assert received["b"]
    assert received["a"].isdisjoint(received["b"])
    assert received["a"] | received["b"] == set(range(SHARDS))
    assert await bus.group_lag("g") == 0


async def test_unacked_deliveries_on_every_shard_come_again_after_the_deadline(
    bus: RedisBus,
) -> None:
    conversations = conversations_on_every_shard(bus, per_shard=1)
    firsts = [make_event(c, 0) for c in conversations]
    seconds = [make_event(c, 1) for c in conversations]
    await bus.publish(firsts + seconds)
    async with bus.subscribe(Subscription("g", "c", ack_deadline_s=0.5)) as c:
        got = await drain(c, SHARDS, ack=False)
        assert sorted(d.event.event_id for d in got) == sorted(e.event_id for e in firsts)
        assert {d.attempt for d in got} == {1}
        # Each conversation's second event waits behind its unacked first.
        assert await c.receive(100, 0.1) == []
        again = await drain(c, SHARDS, ack=False, timeout=5.0)
        assert sorted(d.event.event_id for d in again) == sorted(e.event_id for e in firsts)
        assert {d.attempt for d in again} == {2}
        await c.ack([d.delivery_id for d in again])
        after = await drain(c, SHARDS)
    assert sorted(d.event.event_id for d in after) == sorted(e.event_id for e in seconds)
    assert {d.attempt for d in after} == {1}
    assert await bus.group_lag("g") == 0


async def test_reads_go_to_the_slots_node_without_asking_for_the_keys_first(
    bus: RedisBus, redis_cluster_url: str
) -> None:
    events: list[Event] = [make_event(f"conv{i}", 0) for i in range(200)]
    async with bus.subscribe(Subscription("g", "c")) as c:
        await asyncio.sleep(0.2)
        getkeys = command_calls(redis_cluster_url, "command|getkeys")
        reads = command_calls(redis_cluster_url, "xreadgroup")
        await bus.publish(events)
        got = await drain(c, len(events))
        await asyncio.sleep(0.3)
        reads_after = command_calls(redis_cluster_url, "xreadgroup")
        getkeys_after = command_calls(redis_cluster_url, "command|getkeys")
    assert sorted(d.event.event_id for d in got) == sorted(e.event_id for e in events)
    assert reads_after - reads >= SHARDS  # every slot's reader went round at least once
    assert getkeys_after == getkeys


async def test_a_cluster_that_cannot_be_reached_makes_the_bus_unavailable() -> None:
    bus = RedisBus(f"redis+cluster://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(BusUnavailable):
            await bus.start()
    finally:
        await bus.aclose()


def test_a_cluster_url_opens_a_cluster_client_and_others_a_single_node_one() -> None:
    single = open_redis("redis://127.0.0.1:6379/0")
    cluster = open_redis("redis+cluster://:pw@127.0.0.1:7000/0")
    tls = open_redis("rediss+cluster://127.0.0.1:7000")
    assert not isinstance(single, RedisCluster)
    assert isinstance(cluster, RedisCluster)
    assert isinstance(tls, RedisCluster)
    node = cluster.get_default_node() or cluster.nodes_manager.startup_nodes["127.0.0.1:7000"]
    assert (node.host, node.port) == ("127.0.0.1", 7000)
    assert cluster.get_connection_kwargs()["password"] == "pw"
    assert tls.get_connection_kwargs()["connection_class"].__name__ == "SSLConnection"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+cluster://10.0.0.1:7000", None),
        ("rediss+cluster://user:pw@redis.svc:6380/0", None),
        ("redis+cluster://10.0.0.1:7000/2", "only database 0"),
        ("redis+cluster://10.0.0.1:7000/?db=1", "only database 0"),
        ("redis+cluster:///0", "needs a node's host"),
        ("redis+cluster://10.0.0.1:port", "not host:port"),
        ("memcached://10.0.0.1:11211", "must start with"),
    ],
)
def test_cluster_urls_are_validated(url: str, problem: str | None) -> None:
    found = redis_url_problem(url)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert problem in found
        assert "pw" not in found


def test_config_check_accepts_a_cluster_url_and_masks_its_password(tmp_path: Path) -> None:
    env = {
        "SWITCHBOARD_ENCRYPTION_KEYS": generate_key_spec("k1"),
        "SWITCHBOARD_DATABASE_URL": f"sqlite:///{tmp_path}/cli.db",
        "SWITCHBOARD_DATA_DIR": str(tmp_path),
        "SWITCHBOARD_LOG_FORMAT": "json",
        "SWITCHBOARD_REDIS_URL": "redis+cluster://default:sekritpass@redis.svc:6379/0",
    }
    result = switchboard("config", "check", env=env)
    assert result.returncode == 0, result.stderr
    assert "redis+cluster://default:***@redis.svc:6379/0" in result.stdout
    assert "sekritpass" not in result.stdout + result.stderr
    env["SWITCHBOARD_REDIS_URL"] = "redis+cluster://default:sekritpass@redis.svc:6379/3"
    result = switchboard("config", "check", env=env)
    assert result.returncode == 2
    assert "SWITCHBOARD_REDIS_URL: Redis Cluster has only database 0" in result.stderr
    assert "sekritpass" not in result.stdout + result.stderr
