-- Switchboard schema, version 0006 (PostgreSQL): edits that arrived before their message.
-- Meta may deliver an edit before the message it changes. The early edit has the late
-- message stored with the edited text and edit count, and announced so; only the newest
-- edit of a message (the highest edit_count) is kept, created_at being when it came. Bounded
-- like the tombstones: the outbox relay's periodic purge drops them past the same retention
-- (Store.purge_tombstones).

CREATE TABLE message_early_edits (
    connection_id  text NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
    external_id    text NOT NULL,
    text           text NOT NULL,
    edit_count     integer NOT NULL,
    created_at     timestamptz NOT NULL,
    PRIMARY KEY (connection_id, external_id)
);
CREATE INDEX message_early_edits_created ON message_early_edits (created_at);

-- conversations.tombstone_at (0004) keeps its name but now marks any early change: when an
-- unsend or an edit of a message not stored yet last came in the conversation. Ingestion
-- looks up both tables for the messages of a marked conversation (see gateway.store.ingest).
