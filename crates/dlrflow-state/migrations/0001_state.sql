-- dlrflow-state core tables. dlrflow-reconcile relies on these names and
-- columns; its own migrations are numbered from 1000.

CREATE TABLE IF NOT EXISTS messages (
    message_id       text PRIMARY KEY,
    source           text NOT NULL,
    provider         text NOT NULL,
    total_recipients int,
    total_messages   int,
    total_cost       double precision,
    currency         text,
    scheduled_at     timestamptz,
    queued_at        timestamptz,
    first_seen_at    timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS recipient_state (
    message_id       text NOT NULL,
    recipient        text NOT NULL,
    source           text NOT NULL,
    provider         text NOT NULL,
    status           text NOT NULL CHECK (status IN ('queued', 'processing', 'sent', 'delivered', 'failed')),
    queued_at        timestamptz,
    processing_at    timestamptz,
    sent_at          timestamptz,
    delivered_at     timestamptz,
    failed_at        timestamptz,
    carrier          text,
    error_code       text,
    error_message    text,
    retryable        bool,
    segments         int,
    last_event_at    timestamptz NOT NULL,
    needs_reconcile  bool NOT NULL DEFAULT false,
    reconcile_reason text CHECK (reconcile_reason IN ('conflict', 'stuck', 'incomplete', 'strict')),
    version          bigint NOT NULL DEFAULT 1,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (message_id, recipient)
);

-- The reconcile sweep: non-terminal recipients older than a deadline.
CREATE INDEX IF NOT EXISTS recipient_state_open_idx
    ON recipient_state (last_event_at)
    WHERE status NOT IN ('delivered', 'failed');
-- Recipients flagged for the status API.
CREATE INDEX IF NOT EXISTS recipient_state_flagged_idx
    ON recipient_state (last_event_at)
    WHERE needs_reconcile;
-- Per-message reads use the primary key's (message_id, recipient) prefix.

CREATE TABLE IF NOT EXISTS delivery_events (
    dedupe_key   text PRIMARY KEY,
    message_id   text,
    recipient    text,
    source       text,
    provider     text,
    status       text,
    raw          jsonb,
    received_at  timestamptz,
    outcome      text CHECK (outcome IN ('applied', 'unchanged', 'conflict', 'message')),
    processed_at timestamptz DEFAULT now()
);
CREATE INDEX IF NOT EXISTS delivery_events_message_idx ON delivery_events (message_id);

-- Transactional outbox for dlrflow.delivery.v1: written in the same
-- transaction as the state, published by the relay, then marked.
CREATE TABLE IF NOT EXISTS delivery_outbox (
    id           bigserial PRIMARY KEY,
    update_id    uuid NOT NULL UNIQUE,
    message_id   text NOT NULL,
    payload      text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX IF NOT EXISTS delivery_outbox_pending_idx
    ON delivery_outbox (id) WHERE published_at IS NULL;
