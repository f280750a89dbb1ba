-- Switchboard schema, version 0003 (SQLite): the attempts of outbound messages.
-- One row per try to hand a message to the channel; GetMessage lists them.

CREATE TABLE message_attempts (
    message_id   TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    number       INTEGER NOT NULL,
    started_at   TEXT NOT NULL,
    finished_at  TEXT NOT NULL,
    error        TEXT,
    PRIMARY KEY (message_id, number)
);
