-- Switchboard schema, version 0009 (SQLite): outbox entries held until every group acked.
-- An entry a bus that keeps its own events (Redis) published is no longer let go at once:
-- Redis may lose what it holds (a restart without its data, a failover to a replica that
-- lagged), and the outbox is then the only copy. The relay keeps an entry it published
-- until every consumer group acked it; past a short wait in memory, it marks the entry
-- published and held, published_at being the bus's clock at the append. A held entry is
-- let go once every group acked it (deleted, or kept unheld for its retention when it
-- alone stops Meta's repeats), and published again should the bus turn out to have lost
-- its data (gateway.services.relay).

ALTER TABLE outbox ADD COLUMN held INTEGER NOT NULL DEFAULT 0;
CREATE INDEX outbox_held ON outbox (published_at) WHERE held;
