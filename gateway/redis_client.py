"""Opening Redis: one node or a Redis Cluster, chosen by the URL's scheme.

``redis://`` / ``rediss://`` / ``unix://`` give a client of one server. ``redis+cluster://``
/ ``rediss+cluster://`` give a :class:`~redis.asyncio.cluster.RedisCluster` that starts
from the one node named in the URL and discovers the others (any node, or a Service in
front of them, will do). Both get redis-py's defaults (5 s socket and connect timeouts,
hiredis parsing when installed) and whatever options the URL's query string sets.

Code that must behave differently on a cluster (one ``XREADGROUP`` per hash slot, say)
asks :func:`is_cluster`; everything else works through the common command API. Catch
:data:`REDIS_ERRORS` rather than ``RedisError``: the cluster client reports some failures
(no reachable node, a slot no node serves) outside that family.
"""

from __future__ import annotations

from typing import TypeAlias, TypeGuard
from urllib.parse import parse_qs, urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.connection import parse_url
from redis.exceptions import RedisClusterException, RedisError

__all__ = [
    "CLUSTER_SCHEMES",
    "REDIS_ERRORS",
    "SCHEMES",
    "RedisClient",
    "is_cluster",
    "open_redis",
    "redis_url_problem",
]

RedisClient: TypeAlias = Redis | RedisCluster

# The cluster scheme and the plain one redis-py understands for the same transport.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
SCHEMES = ("redis", "rediss", "unix", *CLUSTER_SCHEMES)

REDIS_ERRORS = (RedisError, RedisClusterException)


def _split_scheme(url: str) -> tuple[str, str]:
    scheme, _, rest = url.partition("://")
    return scheme.lower(), rest


def open_redis(url: str) -> RedisClient:
    """A client for ``url``, not yet connected (the first command connects)."""
    scheme, rest = _split_scheme(url)
    plain = CLUSTER_SCHEMES.get(scheme)
    if plain is None:
        return Redis.from_url(url)
    return RedisCluster.from_url(f"{plain}://{rest}")


def is_cluster(client: RedisClient) -> TypeGuard[RedisCluster]:
    return isinstance(client, RedisCluster)


def redis_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be opened, in one line without the URL (it may hold a
    password); None when it can."""
    scheme, rest = _split_scheme(url)
    if scheme not in SCHEMES or "://" not in url:
        return "must start with redis://, rediss://, unix://, redis+cluster:// or rediss+cluster://"
    if scheme not in CLUSTER_SCHEMES:
        return _readable(url)
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError unless a number from 0 to 65535
    except ValueError:
        return "the cluster node's address is not host:port"
    if not parts.hostname:
        return "a Redis Cluster URL needs a node's host (redis+cluster://host:port)"
    dbs = [parts.path.strip("/"), *parse_qs(parts.query).get("db", [])]
    if any(db not in ("", "0") for db in dbs):
        return "Redis Cluster has only database 0"
    return _readable(f"{CLUSTER_SCHEMES[scheme]}://{rest}")


def _readable(url: str) -> str | None:
    try:
        parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError:
        # redis-py's own error quotes the part it could not read: maybe the password.
        return (
            "redis-py cannot read it; percent-encode the special characters of the"
            " password (a #, ?, /, @ or %)"
        )
    return None
