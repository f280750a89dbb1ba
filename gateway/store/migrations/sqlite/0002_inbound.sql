-- Switchboard schema, version 0002 (SQLite): webhook deliveries kept for inspection.
-- Bounded by the writer: it keeps only the most recent rows (see Tx.quarantine).

CREATE TABLE inbound_quarantine (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    channel      TEXT NOT NULL,
    reason       TEXT NOT NULL,
    account_id   TEXT NOT NULL DEFAULT '',
    body         BLOB NOT NULL,
    body_size    INTEGER NOT NULL,
    received_at  TEXT NOT NULL
);
CREATE INDEX inbound_quarantine_channel ON inbound_quarantine (channel, seq DESC);
