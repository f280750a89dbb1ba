-- Switchboard schema, version 0002 (PostgreSQL): webhook deliveries kept for inspection.
-- Bounded by the writer: it keeps only the most recent rows (see Tx.quarantine).

CREATE TABLE inbound_quarantine (
    seq          bigserial PRIMARY KEY,
    channel      text NOT NULL,
    reason       text NOT NULL,
    account_id   text NOT NULL DEFAULT '',
    body         bytea NOT NULL,
    body_size    integer NOT NULL,
    received_at  timestamptz NOT NULL
);
CREATE INDEX inbound_quarantine_channel ON inbound_quarantine (channel, seq DESC);
