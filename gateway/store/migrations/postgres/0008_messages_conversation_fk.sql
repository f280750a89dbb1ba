-- Switchboard schema, version 0008 (PostgreSQL): storing a message no longer checks and
-- locks its conversation's row.
-- The foreign key from messages.conversation_id had every inserted message run a lookup
-- that takes a FOR KEY SHARE lock on the conversation the same transaction has just
-- upserted: some 15 µs of PostgreSQL's time per message, about a sixth of an inbound
-- event's. Every writer stores a message in the transaction that finds or creates its
-- conversation, so the check never refuses anything. What the constraint also did is kept
-- by a trigger: deleting a conversation (or the connection or participant it cascades
-- from) deletes its messages, whoever deletes it.

ALTER TABLE messages DROP CONSTRAINT IF EXISTS messages_conversation_id_fkey;

CREATE FUNCTION switchboard_delete_conversation_messages() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM messages WHERE conversation_id = OLD.id;
    RETURN OLD;
END
$$;

CREATE TRIGGER conversations_delete_messages
    AFTER DELETE ON conversations
    FOR EACH ROW EXECUTE FUNCTION switchboard_delete_conversation_messages();
