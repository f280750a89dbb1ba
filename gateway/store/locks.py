"""Advisory locks that keep two kinds of writers of PostgreSQL from deadlocking.

Meta echoes every message the gateway sends, and the echo may be committed before the
Send API's answer is recorded: the webhook then stores it as a message of its own under
its Meta id, and recording the answer deletes that row and takes the id, under the unique
index (connection_id, external_id). Run at the same time, each transaction waits on index
entries the other has not committed yet: the recording meets a duplicate key (the echo was
committed after its snapshot), or, with several messages on each side written in different
orders, the two deadlock and PostgreSQL aborts one after a second.

So a webhook batch holding echoes and an outcome batch holding Meta ids first take this
transaction lock on each of those ids, all in one order (by the lock's key), before writing
any message: when both name the same message, the second waits for the first to commit, and
its statements, taking their snapshots after that, see the first's rows. Batches about
different messages do not wait for each other, whatever their account. A transaction takes
one lock per id, at most its batch's size (100 outcomes, or the webhook batch's echoes), well
within PostgreSQL's shared lock table (64 per connection by default). SQLite has one writer
at a time and needs none.
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.store.rows import Params

# The first key of these two-key advisory locks, so that they share no key with locks the
# operator's own tooling may take; the second is the Meta id's hash. Two ids that hash alike
# share a lock, which only makes their batches wait for each other.
_MESSAGE_IDS_SPACE = 0x53420001

# Volatile functions in a target list are evaluated after ORDER BY: the locks are taken
# in key order.
_LOCK_MESSAGE_IDS = (
    f"SELECT pg_advisory_xact_lock({_MESSAGE_IDS_SPACE}, k)"  # noqa: S608 - ours
    " FROM (SELECT DISTINCT hashtext(e) AS k FROM unnest(:e::text[]) AS e) AS h ORDER BY k"
)


def message_ids_lock(external_ids: Iterable[str]) -> tuple[str, Params] | None:
    """The statement that locks these Meta message ids; None for none."""
    unique = sorted({e for e in external_ids if e})
    if not unique:
        return None
    return _LOCK_MESSAGE_IDS, {"e": unique}
