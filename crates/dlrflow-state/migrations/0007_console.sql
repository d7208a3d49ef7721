-- The operator page (`/console` on the admin listener).
--
-- Copies of an event the consumer dropped as duplicates, per recipient
-- ('' for a message-level event): counted after each batch, best effort,
-- and including the redeliveries of a batch that was written but not yet
-- committed to Kafka when its consumer stopped. Informational only: nothing
-- reads it but the page, and `rebuild` neither writes nor compares it.
CREATE TABLE IF NOT EXISTS dropped_copies (
    message_id text        NOT NULL,
    recipient  text        NOT NULL,
    copies     bigint      NOT NULL,
    last_at    timestamptz NOT NULL,
    PRIMARY KEY (message_id, recipient)
);

-- The page's funnel counts the recipients first seen in a time window.
-- created_at never changes, so this index costs one entry per new
-- recipient and does not stop HOT updates of a row.
CREATE INDEX IF NOT EXISTS recipient_state_created_idx ON recipient_state (created_at);
