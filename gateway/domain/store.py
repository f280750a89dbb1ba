"""The Store protocol: the system of record, behind one interface with two backends.

``gateway.store.postgres`` (production, psycopg 3 + psycopg_pool) and
``gateway.store.sqlite`` (the embedded default) both implement it, and one contract test
suite (``tests/store``) runs every method against both.

All data access happens inside a unit of work::

    async with store.transaction() as tx:
        conn = await tx.get_connection(connection_id)
        await tx.add_events([...])          # committed together with the data

Events written through ``tx.add_events`` land in the outbox in the same transaction as the
data they describe; the outbox relay publishes them to the bus afterwards.

Errors: every method raises :class:`~gateway.domain.errors.StoreUnavailable` when the
database cannot be reached, and :class:`~gateway.domain.errors.AlreadyExists` on a
uniqueness conflict that the method does not resolve itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Protocol, Self

from gateway.domain.events import Event
from gateway.domain.inbound import IngestResult, QuarantinedDelivery, RoutedItem
from gateway.domain.models import (
    ApiToken,
    Connection,
    ConnectionStatus,
    Conversation,
    Credential,
    Message,
    OAuthState,
    Page,
    Participant,
)
from gateway.domain.outbound import DeliveryAttempt, SendBatch, SendTarget


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """An event waiting in the outbox; ``seq`` orders entries in commit order."""

    seq: int
    event: Event
    attempts: int = 0
    # The event as the outbox holds it (gateway.domain.codec.encode_event), when the writer
    # has it at hand: the bus publishes these bytes rather than encoding the event again.
    wire: bytes = b""
    # When it was published, where the reader needs it (the in-process bus's reload).
    published_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class BusState:
    """What the in-process bus keeps in the store, as read back when it starts."""

    # Published entries, in seq order.
    entries: list[OutboxEntry]
    # Per known group, the seqs it has acked among them.
    acked: dict[str, set[int]]
    # Per group, how often each entry it had not acked was handed out (as far as written).
    attempts: dict[str, dict[int, int]]


class Tx(Protocol):
    """The data operations; valid only inside ``Store.transaction()``."""

    # ---- API tokens (only hashes are stored) ----
    async def create_api_token(self, token: ApiToken, token_hash: str) -> None: ...
    async def find_api_token(self, token_hash: str) -> ApiToken | None:
        """The token with this hash, or None when unknown or revoked."""

    async def list_api_tokens(self) -> list[ApiToken]: ...
    async def revoke_api_token(self, id_or_name: str, now: datetime) -> int:
        """Revokes by id or name; returns how many tokens were revoked."""

    async def touch_api_token(self, token_id: str, now: datetime) -> None: ...

    # ---- OAuth states ----
    async def put_oauth_state(self, state: OAuthState) -> None: ...
    async def take_oauth_state(self, state_hash: str, now: datetime) -> OAuthState | None:
        """Deletes and returns the state; None when unknown, already used or expired."""

    async def purge_oauth_states(self, now: datetime) -> int: ...

    # ---- connections and their encrypted credentials ----
    async def save_connection(self, conn: Connection) -> None:
        """Inserts or updates by id. Only one non-DISCONNECTED connection may hold a
        (channel, account.external_id): AlreadyExists otherwise. ``last_event_at`` only
        moves forward (see ``advance_last_event_at``)."""

    async def get_connection(
        self, connection_id: str, *, for_update: bool = False
    ) -> Connection | None:
        """``for_update``: the transaction writes it back; a concurrent one that does too
        waits for this one's end, then reads what it wrote (no lost update)."""

    async def find_connection_by_account(self, channel: str, external_id: str) -> Connection | None:
        """The non-DISCONNECTED connection of that account, if any."""

    async def find_connections_by_account_ids(
        self, channel: str, account_ids: Sequence[str]
    ) -> list[Connection]:
        """Non-DISCONNECTED connections whose account external_id or page_id is listed
        (webhook routing)."""

    async def list_connections(
        self,
        tenant_id: str,
        *,
        page_size: int,
        page_token: str = "",
        channel: str = "",
        statuses: Sequence[ConnectionStatus] = (),
    ) -> Page[Connection]:
        """Newest first. A malformed page_token raises InvalidArgument('page_token')."""

    async def advance_last_event_at(self, times: Mapping[str, datetime]) -> None:
        """Moves each named connection's ``last_event_at`` forward to the time given, never
        back (a NULL one counts as earliest); ids of no connection are ignored. Sets
        nothing else (not ``updated_at``) and emits no event."""

    async def count_connections_by_status(self) -> dict[tuple[str, ConnectionStatus], int]: ...
    async def claim_connections_due(
        self, *, due_before: datetime, now: datetime, lease_until: datetime, limit: int
    ) -> list[Connection]:
        """CONNECTED connections whose token expires before ``due_before`` and whose lease
        has lapsed; leases them until ``lease_until`` so no other worker claims them."""

    async def put_credential(self, credential: Credential) -> None: ...
    async def get_credential(self, connection_id: str) -> Credential | None: ...
    async def delete_credential(self, connection_id: str) -> bool: ...
    async def list_credentials(self, *, after_connection_id: str, limit: int) -> list[Credential]:
        """Locked until the transaction ends, as ``get_connection(for_update=True)``: they
        are read to be written back (key rotation)."""

    # ---- participants, conversations, messages ----
    async def upsert_participant(self, participant: Participant) -> Participant:
        """Unique on (connection_id, channel_user_id); returns the stored row (with its id
        when it existed). Profile fields are only overwritten by non-empty values."""

    async def get_participant(self, participant_id: str) -> Participant | None: ...
    async def upsert_conversation(self, conversation: Conversation) -> Conversation:
        """Unique on (connection_id, participant); times only move forward."""

    async def get_conversation(self, conversation_id: str) -> Conversation | None: ...
    async def list_conversations(
        self, tenant_id: str, *, connection_id: str = "", page_size: int, page_token: str = ""
    ) -> Page[Conversation]:
        """Most recent activity first."""

    async def insert_message(self, message: Message) -> tuple[Message, bool]:
        """Inserts; on a conflict of (connection_id, external_id) or (tenant_id,
        idempotency_key) returns the existing message and False."""

    async def update_message(self, message: Message) -> None: ...
    async def get_message(self, message_id: str) -> Message | None: ...
    async def find_message_by_external_id(
        self, connection_id: str, external_id: str
    ) -> Message | None: ...
    async def list_messages(
        self, conversation_id: str, *, page_size: int, page_token: str = ""
    ) -> Page[Message]:
        """Newest first."""

    # ---- inbound: webhook ingestion (gateway.services.inbound) ----
    async def ingest_inbound(self, items: Sequence[RoutedItem]) -> list[IngestResult]:
        """Stores a batch of routed items in a few statements, one result per item in order:
        participants (unique per connection and channel user id), conversations (one per
        connection and participant; last message, last inbound and window times only move
        forward), received and echoed messages (unique per connection and external id:
        a duplicate is reported, not stored again), edits (applied when not older than the
        stored edit) and unsends: of known messages, or remembered (tombstones) so that
        the message, should it come later, is stored deleted (``deleted_before_arrival``)."""

    async def quarantine(self, entries: Sequence[QuarantinedDelivery], *, keep: int) -> None:
        """Keeps the entries, and only the ``keep`` most recent entries of all."""

    async def list_quarantine(
        self, *, channel: str = "", limit: int = 100
    ) -> list[QuarantinedDelivery]:
        """Most recent first."""

    # ---- outbound: sending (gateway.services.outbound) ----
    async def find_conversation_for_recipient(
        self, connection_id: str, channel_user_id: str
    ) -> Conversation | None:
        """The connection's conversation with that customer, if they ever wrote."""

    async def find_message_by_idempotency_key(self, tenant_id: str, key: str) -> Message | None: ...

    async def enqueue_outbound(
        self, message: Message, lease_until: datetime
    ) -> tuple[Message, bool]:
        """Inserts an outbound message leased until ``lease_until`` (its first attempt is
        under way); on a conflict of (tenant_id, idempotency_key) returns the existing
        message and False."""

    async def record_outbound(
        self, message: Message, attempt: DeliveryAttempt | None, *, lease_until: datetime | None
    ) -> Message:
        """Writes the status fields, the attempt (if any) and the lease (None releases it).
        Should an echo of ``external_id`` have been stored as a message of its own, that
        message is removed and ``confirmed_at`` set from it."""

    # The batch forms the group commits use: a constant number of statements per batch.
    async def get_connections(self, ids: Sequence[str]) -> dict[str, Connection]: ...
    async def find_messages_by_idempotency_keys(
        self, pairs: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], Message]:
        """By (tenant_id, idempotency_key)."""

    async def list_attempts(self, message_id: str) -> list[DeliveryAttempt]: ...
    async def count_send_queue(self) -> int:
        """Outbound messages QUEUED or RETRYING."""

    async def find_unadopted_echo(
        self, message: Message, since: datetime
    ) -> tuple[str, datetime] | None:
        """(external id, time) of an echo stored since ``since`` as a message of its own in
        the pending ``message``'s conversation, with its text: the channel delivered the
        message although its attempt did not hear so."""

    async def confirm_outbound(self, echoes: Sequence[tuple[str, str, datetime]]) -> list[Message]:
        """Sets ``confirmed_at`` on sent messages named by (connection_id, external_id,
        time) and not confirmed yet; returns the messages it changed."""

    # Send order: an outbound message that keeps order (all but sender actions) is not
    # attempted while an earlier one of its conversation (created_at, then id) is QUEUED
    # or RETRYING. The send path's batches (group commits) use these.
    async def get_send_targets(self, ids: Sequence[str]) -> dict[str, SendTarget]:
        """Conversations by id, each with its latest pending ordered message's time."""

    async def find_send_targets_for_recipients(
        self, pairs: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], SendTarget]:
        """The same, by (connection_id, channel_user_id)."""

    async def find_send_batch(
        self,
        conversation_ids: Sequence[str],
        connection_ids: Sequence[str],
        pairs: Sequence[tuple[str, str]],
    ) -> SendBatch:
        """``get_send_targets``, ``get_connections`` and
        ``find_send_targets_for_recipients`` in one go (one round trip where the store
        can)."""

    async def enqueue_outbound_in_order(
        self, messages: Sequence[Message], lease_until: datetime, *, behind: Sequence[str]
    ) -> list[tuple[Message, bool]]:
        """``enqueue_outbound`` for each message, in order; the messages whose ids are in
        ``behind`` wait for an earlier one of their conversation and are stored without a
        lease."""

    async def record_outbound_and_peek(
        self,
        items: Sequence[tuple[Message, DeliveryAttempt | None]],
        *,
        lease_until: datetime | None,
    ) -> tuple[list[Message], bool]:
        """``record_outbound`` for each item, in order, and whether a message that settled
        (SENT or FAILED) has another of its conversation still pending: the next one may
        go now."""

    async def record_outbound_deferred(
        self,
        items: Sequence[tuple[Message, DeliveryAttempt | None]],
        *,
        lease_until: datetime | None,
    ) -> Callable[[], Awaitable[tuple[list[Message], bool]]]:
        """``record_outbound_and_peek``, its answer read by awaiting the function returned,
        after the transaction's next statements: where the store can, they travel together
        (the statements run in the order they were issued)."""

    async def claim_next_messages(
        self, *, now: datetime, lease_until: datetime, limit: int
    ) -> list[Message]:
        """Outbound QUEUED/RETRYING messages with next_attempt_at <= now whose lease lapsed,
        in send order: only the oldest pending ordered message of a conversation (and any
        due sender action) can be claimed. Each is leased until ``lease_until`` so
        concurrent workers never claim it twice."""

    # ---- outbox ----
    async def add_events(self, events: Sequence[Event]) -> None: ...
    async def add_claimed_events(
        self, events: Sequence[Event], lease_until: datetime
    ) -> list[OutboxEntry]:
        """Adds events already claimed until ``lease_until`` by this process's relay, which
        publishes them right after the commit; the sweep takes them should it not."""

    async def add_claimed_events_deferred(
        self, events: Sequence[Event], lease_until: datetime
    ) -> Callable[[], Awaitable[list[OutboxEntry]]]:
        """``add_claimed_events``, its entries read by awaiting the function returned, which
        may be after the transaction committed: where the store can, the statement then
        travels with the COMMIT."""

    # ---- connect: refresh scheduling and reconciliation (gateway.services.refresh) ----
    async def set_connection_claim(self, connection_id: str, until: datetime | None) -> None:
        """Leases the connection until ``until`` (None releases it): a worker that backs
        off after a failure keeps other workers away until its retry time."""

    async def scan_connections(
        self, *, statuses: Sequence[ConnectionStatus], after_id: str, limit: int
    ) -> list[Connection]:
        """Connections of every tenant with one of ``statuses``, by id after ``after_id``."""

    async def nearest_token_expiry(self) -> datetime | None:
        """The earliest ``token_expires_at`` among CONNECTED connections."""


class Store(Protocol):
    """Owns the connection pool; an async context manager (``open``/``aclose``)."""

    backend: str  # "postgres" or "sqlite"

    async def open(self) -> None: ...
    async def aclose(self) -> None: ...
    async def __aenter__(self) -> Self:
        """Opens the store (``open()``) and returns it."""

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Closes the store (``aclose()``)."""

    async def ping(self) -> None:
        """Raises StoreUnavailable unless the database answers."""

    async def migrate(self) -> list[str]:
        """Applies pending migrations; returns the versions applied (empty: up to date)."""

    async def applied_migrations(self) -> list[str]: ...
    def transaction(self, *, pipelined: bool = False) -> AbstractAsyncContextManager[Tx]:
        """A transaction, committed when the block succeeds. ``pipelined``: for a block
        built around statements sent without waiting (``record_outbound_deferred``,
        ``find_send_batch``), which then share round trips; every other statement costs
        more that way (PostgreSQL's pipeline mode), so it is not the default."""

    # The outbox relay's side (outside the producers' transactions).
    async def claim_outbox(
        self, *, now: datetime, lease_until: datetime, limit: int
    ) -> list[OutboxEntry]:
        """Unpublished entries in seq order whose lease lapsed, leased to the caller."""

    async def extend_outbox_claims(
        self, seqs: Sequence[int], *, now: datetime, lease_until: datetime
    ) -> None:
        """Keeps entries claimed until ``lease_until``, those still claimed at ``now`` (a
        lapsed claim may be another relay's by now)."""

    async def mark_published(self, seqs: Sequence[int], now: datetime) -> None: ...
    async def delete_published(self, seqs: Sequence[int]) -> None:
        """Deletes entries a bus that keeps its own events (``Bus.keeps_events``) published:
        cheaper than marking them, and nothing reads them again."""

    async def hold_published(self, seqs: Sequence[int], appended_at: datetime) -> None:
        """Marks entries published, and held: the bus has them, but not every group acked
        them yet, and the bus may still lose them. ``appended_at``: the bus's clock when it
        appended them (what :meth:`release_held` compares)."""

    async def release_held(self, before: datetime, drop_kinds: Collection[str]) -> int:
        """Lets go of the held entries appended before ``before`` (every group acked them):
        deleted if their event's kind is one of ``drop_kinds``, else kept unheld, published,
        for their retention. Returns how many."""

    async def reclaim_held(self, now: datetime) -> int:
        """Makes every held entry claimable again, unpublished: the bus lost what it held.
        Returns how many."""

    async def purge_published(self, before: datetime) -> int:
        """Deletes published entries older than ``before`` (retention), with what the bus
        recorded of them (acks, attempts)."""

    async def purge_tombstones(self, before: datetime) -> int:
        """Deletes what ingestion keeps of early changes, stored before ``before``: the
        tombstones of unsends and the early edits (of messages not stored when the unsend
        or the edit came); returns how many rows went, both kinds together."""

    # The in-process bus's durable state (gateway.bus.memory): the outbox is its log.
    async def bus_load(self, *, since: datetime) -> BusState:
        """The entries published at or after ``since``, and each group's acks and delivery
        attempts among them."""

    async def bus_add_group(self, group: str, now: datetime) -> None:
        """Records a consumer group (idempotent)."""

    async def bus_ack(self, group: str, seqs: Sequence[int]) -> None:
        """Records that ``group`` acked these entries (idempotent)."""

    async def bus_record_attempts(self, group: str, attempts: Mapping[int, int]) -> None:
        """Records how often ``group`` was handed each entry (by seq); a lower count than
        the one recorded changes nothing."""
