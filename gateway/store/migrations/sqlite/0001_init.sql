-- Switchboard schema, version 0001 (SQLite).
-- Times are fixed-width UTC ISO 8601 text (sortable); structured values are JSON text.

CREATE TABLE api_tokens (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    token_hash    TEXT NOT NULL UNIQUE,
    tenants       TEXT NOT NULL,
    scopes        TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    revoked_at    TEXT,
    last_used_at  TEXT
);
CREATE INDEX api_tokens_name ON api_tokens (name);

CREATE TABLE oauth_states (
    state_hash  TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL,
    channel     TEXT NOT NULL,
    login_flow  TEXT NOT NULL,
    return_url  TEXT NOT NULL,
    expires_at  TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE INDEX oauth_states_expires ON oauth_states (expires_at);

CREATE TABLE connections (
    id                    TEXT PRIMARY KEY,
    tenant_id             TEXT NOT NULL,
    channel               TEXT NOT NULL,
    status                TEXT NOT NULL,
    account_external_id   TEXT NOT NULL,
    account_username      TEXT NOT NULL DEFAULT '',
    account_display_name  TEXT NOT NULL DEFAULT '',
    account_picture_url   TEXT NOT NULL DEFAULT '',
    account_page_id       TEXT NOT NULL DEFAULT '',
    login_flow            TEXT NOT NULL DEFAULT '',
    scopes                TEXT NOT NULL,
    token_expires_at      TEXT,
    connected_at          TEXT,
    last_event_at         TEXT,
    last_error            TEXT NOT NULL DEFAULT '',
    created_at            TEXT NOT NULL,
    updated_at            TEXT NOT NULL,
    claimed_until         TEXT
);
-- One live connection per channel account; a DISCONNECTED one frees the account.
CREATE UNIQUE INDEX connections_live_account
    ON connections (channel, account_external_id) WHERE status <> 'DISCONNECTED';
-- Webhooks of the Facebook Login flow name the page, not the Instagram account.
CREATE INDEX connections_live_page
    ON connections (channel, account_page_id)
    WHERE status <> 'DISCONNECTED' AND account_page_id <> '';
CREATE INDEX connections_tenant_created ON connections (tenant_id, created_at DESC, id DESC);
CREATE INDEX connections_refresh_due
    ON connections (token_expires_at) WHERE status = 'CONNECTED';

CREATE TABLE credentials (
    connection_id  TEXT PRIMARY KEY REFERENCES connections (id) ON DELETE CASCADE,
    key_id         TEXT NOT NULL,
    ciphertext     BLOB NOT NULL,
    created_at     TEXT NOT NULL
);

CREATE TABLE participants (
    id                  TEXT PRIMARY KEY,
    connection_id       TEXT NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
    channel_user_id     TEXT NOT NULL,
    username            TEXT NOT NULL DEFAULT '',
    name                TEXT NOT NULL DEFAULT '',
    picture_url         TEXT NOT NULL DEFAULT '',
    profile_fetched_at  TEXT,
    UNIQUE (connection_id, channel_user_id)
);

CREATE TABLE conversations (
    id                 TEXT PRIMARY KEY,
    tenant_id          TEXT NOT NULL,
    connection_id      TEXT NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
    channel            TEXT NOT NULL,
    participant_id     TEXT NOT NULL REFERENCES participants (id) ON DELETE CASCADE,
    created_at         TEXT NOT NULL,
    last_message_at    TEXT,
    last_inbound_at    TEXT,
    window_expires_at  TEXT,
    -- The listing's sort key: most recent activity first.
    activity_at        TEXT GENERATED ALWAYS AS (COALESCE(last_message_at, created_at)) STORED,
    UNIQUE (connection_id, participant_id)
);
CREATE INDEX conversations_tenant_activity ON conversations (tenant_id, activity_at DESC, id DESC);
CREATE INDEX conversations_connection_activity
    ON conversations (connection_id, activity_at DESC, id DESC);

CREATE TABLE messages (
    id               TEXT PRIMARY KEY,
    tenant_id        TEXT NOT NULL,
    connection_id    TEXT NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
    conversation_id  TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    channel          TEXT NOT NULL,
    direction        TEXT NOT NULL,
    status           TEXT NOT NULL,
    external_id      TEXT NOT NULL DEFAULT '',
    sender_id        TEXT NOT NULL DEFAULT '',
    text             TEXT NOT NULL DEFAULT '',
    attachments      TEXT NOT NULL,
    content          TEXT NOT NULL,
    idempotency_key  TEXT NOT NULL DEFAULT '',
    error            TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TEXT,
    claimed_until    TEXT,
    created_at       TEXT NOT NULL,
    sent_at          TEXT,
    confirmed_at     TEXT,
    deleted          INTEGER NOT NULL DEFAULT 0,
    edit_count       INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX messages_external_id
    ON messages (connection_id, external_id) WHERE external_id <> '';
CREATE UNIQUE INDEX messages_idempotency_key
    ON messages (tenant_id, idempotency_key) WHERE idempotency_key <> '';
CREATE INDEX messages_conversation_created
    ON messages (conversation_id, created_at DESC, id DESC);
-- Only the send queue is scanned by the retry worker; keep its index small.
CREATE INDEX messages_send_due ON messages (next_attempt_at)
    WHERE direction = 'OUTBOUND' AND status IN ('QUEUED', 'RETRYING');

CREATE TABLE outbox (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id       TEXT NOT NULL UNIQUE,
    event          TEXT NOT NULL,
    created_at     TEXT NOT NULL,
    published_at   TEXT,
    claimed_until  TEXT,
    attempts       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX outbox_unpublished ON outbox (seq) WHERE published_at IS NULL;
CREATE INDEX outbox_published ON outbox (published_at) WHERE published_at IS NOT NULL;

CREATE TABLE bus_groups (
    group_name  TEXT PRIMARY KEY,
    created_at  TEXT NOT NULL
);

CREATE TABLE bus_acks (
    group_name  TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    PRIMARY KEY (group_name, seq)
);
CREATE INDEX bus_acks_seq ON bus_acks (seq);
