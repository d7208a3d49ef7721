-- dlrflow-reconcile's own tables (versions from 1000; dlrflow-state owns 1..999).

CREATE TABLE IF NOT EXISTS reconcile_jobs (
    message_id          text PRIMARY KEY,
    source              text NOT NULL,
    -- conflict | stuck | incomplete | strict (why the job was opened last)
    reason              text NOT NULL,
    -- How old the trigger is (oldest silent recipient, flag time, queue time):
    -- due jobs are read oldest first.
    since               timestamptz NOT NULL,
    due_at              timestamptz NOT NULL,
    attempts            int NOT NULL DEFAULT 0,
    reads               int NOT NULL DEFAULT 0,
    first_requested_at  timestamptz NOT NULL,
    last_attempt_at     timestamptz,
    last_error          text,
    lease_owner         text,
    lease_until         timestamptz,
    -- Database time just before the last successful read, or the newest
    -- recipient_state.updated_at that read wrote, whichever is later.
    last_read_at        timestamptz,
    done_at             timestamptz,
    gave_up             boolean NOT NULL DEFAULT false
);

CREATE INDEX IF NOT EXISTS reconcile_jobs_open ON reconcile_jobs (since, message_id) WHERE done_at IS NULL;
CREATE INDEX IF NOT EXISTS reconcile_jobs_done ON reconcile_jobs (done_at) WHERE done_at IS NOT NULL;

-- Sweep indexes on dlrflow-state's tables, when they exist (they do when
-- dlrflow-state's migrations ran first, which App::build ensures).
DO $$
BEGIN
    IF to_regclass('recipient_state') IS NOT NULL THEN
        CREATE INDEX IF NOT EXISTS reconcile_recipient_open
            ON recipient_state (last_event_at)
            WHERE status IN ('queued', 'processing', 'sent');
        CREATE INDEX IF NOT EXISTS reconcile_recipient_flagged
            ON recipient_state (message_id)
            WHERE needs_reconcile;
        CREATE INDEX IF NOT EXISTS reconcile_recipient_updated
            ON recipient_state (source, updated_at);
    END IF;
END
$$;
