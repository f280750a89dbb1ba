-- Switchboard schema, version 0003 (PostgreSQL): the attempts of outbound messages.
-- One row per try to hand a message to the channel; GetMessage lists them.

CREATE TABLE message_attempts (
    message_id   text NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    number       integer NOT NULL,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz NOT NULL,
    error        jsonb,
    PRIMARY KEY (message_id, number)
);
