-- Switchboard schema, version 0007 (PostgreSQL): a message no longer locks its connection.
-- The foreign key from messages.connection_id to connections had every inserted message
-- take a FOR KEY SHARE lock on its connection's row: one hot row that every concurrent
-- ingest batch of an account locks (a multixact as soon as two overlap), and about a tenth
-- of PostgreSQL's time per inbound event. Deleting a connection still deletes its messages:
-- through messages.conversation_id, whose conversation cascades from the connection.

ALTER TABLE messages DROP CONSTRAINT IF EXISTS messages_connection_id_fkey;
