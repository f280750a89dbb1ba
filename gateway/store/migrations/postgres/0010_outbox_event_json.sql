-- Switchboard schema, version 0010 (PostgreSQL): outbox events stored as json, not jsonb.
-- An outbox entry is written once, read back whole (by the sweep, after a crash or an
-- outage) and deleted; no statement looks inside it but the rare release of held entries.
-- jsonb converted every event on the way in: some 8 µs of PostgreSQL's time per event on
-- the inbound and send paths (an event of about 800 bytes, 74 to a batch), for an indexable
-- form nothing uses. json only checks the text and keeps it as it came.

ALTER TABLE outbox ALTER COLUMN event TYPE json USING event::json;
