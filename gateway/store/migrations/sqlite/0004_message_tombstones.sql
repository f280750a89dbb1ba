-- Switchboard schema, version 0004 (SQLite): unsends that arrived before their message.
-- Meta may deliver an unsend before the message it takes back. The tombstone has the late
-- message stored deleted and not announced; the mark on the conversation tells ingestion
-- which messages to look up (see gateway.store.ingest). Bounded: the outbox relay's
-- periodic purge drops tombstones past their retention (Store.purge_tombstones).

CREATE TABLE message_tombstones (
    connection_id  TEXT NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
    external_id    TEXT NOT NULL,
    deleted_at     TEXT NOT NULL,
    created_at     TEXT NOT NULL,
    PRIMARY KEY (connection_id, external_id)
);
CREATE INDEX message_tombstones_created ON message_tombstones (created_at);

-- When an unsend of a message not stored yet last came in the conversation.
ALTER TABLE conversations ADD COLUMN tombstone_at TEXT;
