-- Switchboard schema, version 0011 (PostgreSQL): the in-process bus's delivery attempts.
-- The in-process bus counts how often it handed each entry to a group. It used to keep that
-- count in memory only, so an entry delivered and not acked before a restart came again as
-- attempt 1, as if new. The bus now writes the count of an entry still unacked when it
-- writes its acks (batched, behind the consumers' backs), and reads it back on start: the
-- redelivery after a restart is attempt + 1, as after an ack deadline. An entry acked
-- before that write leaves no row. Rows go with their outbox entry (retention).

CREATE TABLE bus_attempts (
    group_name  text NOT NULL,
    seq         bigint NOT NULL,
    attempts    integer NOT NULL,
    PRIMARY KEY (group_name, seq)
);
