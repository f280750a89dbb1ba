-- Switchboard schema, version 0005 (PostgreSQL): send order within a conversation.
-- An outbound message is not attempted while an earlier one of its conversation (by
-- created_at, then id) is still QUEUED or RETRYING. Sender actions (typing, mark seen)
-- neither wait nor hold others up: they are stored unordered.

ALTER TABLE messages ADD COLUMN unordered boolean NOT NULL DEFAULT false;

-- The pending messages of a conversation in send order: what SendMessage's lookup asks
-- (is one pending?) and what the worker's claim asks (is an earlier one pending?). Only
-- pending rows are in it, so it stays as small as the send queue.
CREATE INDEX messages_send_order ON messages (conversation_id, created_at, id)
    WHERE direction = 'OUTBOUND' AND status IN ('QUEUED', 'RETRYING') AND NOT unordered;
