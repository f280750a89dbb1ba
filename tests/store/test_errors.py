"""What a store failure means to its callers: the store being down (StoreUnavailable, worth
a retry later, with every other job of a batch) or one request it cannot take (an error of
that request alone)."""

from __future__ import annotations

import dataclasses
import secrets

import psycopg.errors
import pytest

from gateway.domain.errors import Unavailable
from tests.store.conftest import AnyStore
from tests.store.factories import connection, event


async def test_a_row_past_one_of_postgresqls_limits_is_not_the_store_being_down(
    store: AnyStore,
) -> None:
    # An id too large for a btree index entry (about 2.7 kB): reported as the store being
    # unavailable, it failed every job batched with it, on every retry.
    conn = connection()
    huge = dataclasses.replace(event(conn), event_id="evt_" + secrets.token_hex(4000))
    if store.backend == "sqlite":
        async with store.transaction() as tx:
            await tx.add_events([huge])
        return
    with pytest.raises(psycopg.errors.ProgramLimitExceeded) as refused:
        async with store.transaction() as tx:
            await tx.add_events([huge])
    assert not isinstance(refused.value, Unavailable)
    # The store itself is fine.
    async with store.transaction() as tx:
        await tx.add_events([event(conn)])
