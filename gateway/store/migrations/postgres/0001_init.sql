-- Switchboard schema, version 0001 (PostgreSQL).
-- Times are timestamptz (UTC in, UTC out); structured values are JSONB.

CREATE TABLE api_tokens (
    id            text PRIMARY KEY,
    name          text NOT NULL,
    token_hash    text NOT NULL UNIQUE,
    tenants       jsonb NOT NULL,
    scopes        jsonb NOT NULL,
    created_at    timestamptz NOT NULL,
    revoked_at    timestamptz,
    last_used_at  timestamptz
);
CREATE INDEX api_tokens_name ON api_tokens (name);

CREATE TABLE oauth_states (
    state_hash  text PRIMARY KEY,
    tenant_id   text NOT NULL,
    channel     text NOT NULL,
    login_flow  text NOT NULL,
    return_url  text NOT NULL,
    expires_at  timestamptz NOT NULL,
    created_at  timestamptz NOT NULL
);
CREATE INDEX oauth_states_expires ON oauth_states (expires_at);

CREATE TABLE connections (
    id                    text PRIMARY KEY,
    tenant_id             text NOT NULL,
    channel               text NOT NULL,
    status                text NOT NULL,
    account_external_id   text NOT NULL,
    account_username      text NOT NULL DEFAULT '',
    account_display_name  text NOT NULL DEFAULT '',
    account_picture_url   text NOT NULL DEFAULT '',
    account_page_id       text NOT NULL DEFAULT '',
    login_flow            text NOT NULL DEFAULT '',
    scopes                jsonb NOT NULL,
    token_expires_at      timestamptz,
    connected_at          timestamptz,
    last_event_at         timestamptz,
    last_error            text NOT NULL DEFAULT '',
    created_at            timestamptz NOT NULL,
    updated_at            timestamptz NOT NULL,
    claimed_until         timestamptz
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
    connection_id  text PRIMARY KEY REFERENCES connections (id) ON DELETE CASCADE,
    key_id         text NOT NULL,
    ciphertext     bytea NOT NULL,
    created_at     timestamptz NOT NULL
);

CREATE TABLE participants (
    id                  text PRIMARY KEY,
    connection_id       text NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
    channel_user_id     text NOT NULL,
    username            text NOT NULL DEFAULT '',
    name                text NOT NULL DEFAULT '',
    picture_url         text NOT NULL DEFAULT '',
    profile_fetched_at  timestamptz,
    UNIQUE (connection_id, channel_user_id)
);

CREATE TABLE conversations (
    id                 text PRIMARY KEY,
    tenant_id          text NOT NULL,
    connection_id      text NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
    channel            text NOT NULL,
    participant_id     text NOT NULL REFERENCES participants (id) ON DELETE CASCADE,
    created_at         timestamptz NOT NULL,
    last_message_at    timestamptz,
    last_inbound_at    timestamptz,
    window_expires_at  timestamptz,
    -- The listing's sort key: most recent activity first.
    activity_at        timestamptz GENERATED ALWAYS AS (COALESCE(last_message_at, created_at)) STORED,
    UNIQUE (connection_id, participant_id)
);
CREATE INDEX conversations_tenant_activity ON conversations (tenant_id, activity_at DESC, id DESC);
CREATE INDEX conversations_connection_activity
    ON conversations (connection_id, activity_at DESC, id DESC);

CREATE TABLE messages (
    id               text PRIMARY KEY,
    tenant_id        text NOT NULL,
    connection_id    text NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
    conversation_id  text NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    channel          text NOT NULL,
    direction        text NOT NULL,
    status           text NOT NULL,
    external_id      text NOT NULL DEFAULT '',
    sender_id        text NOT NULL DEFAULT '',
    text             text NOT NULL DEFAULT '',
    attachments      jsonb NOT NULL,
    content          jsonb NOT NULL,
    idempotency_key  text NOT NULL DEFAULT '',
    error            jsonb,
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz,
    claimed_until    timestamptz,
    created_at       timestamptz NOT NULL,
    sent_at          timestamptz,
    confirmed_at     timestamptz,
    deleted          boolean NOT NULL DEFAULT false,
    edit_count       integer NOT NULL DEFAULT 0
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
    seq            bigserial PRIMARY KEY,
    event_id       text NOT NULL UNIQUE,
    event          jsonb NOT NULL,
    created_at     timestamptz NOT NULL,
    published_at   timestamptz,
    claimed_until  timestamptz,
    attempts       integer NOT NULL DEFAULT 0
);
CREATE INDEX outbox_unpublished ON outbox (seq) WHERE published_at IS NULL;
CREATE INDEX outbox_published ON outbox (published_at) WHERE published_at IS NOT NULL;

CREATE TABLE bus_groups (
    group_name  text PRIMARY KEY,
    created_at  timestamptz NOT NULL
);

CREATE TABLE bus_acks (
    group_name  text NOT NULL,
    seq         bigint NOT NULL,
    PRIMARY KEY (group_name, seq)
);
CREATE INDEX bus_acks_seq ON bus_acks (seq);
