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

-- Where the strict sweep got to: it only scans changes since (minus the debounce).
CREATE TABLE IF NOT EXISTS reconcile_watermarks (
    name text PRIMARY KEY,
    at   timestamptz NOT NULL
);

-- The strict sweep scans recent changes per source and the incomplete sweep
-- announced messages by age. (dlrflow-state's own migration already indexes
-- open and flagged recipients, which the other triggers use.) Only when the
-- tables exist: dlrflow-state's migrations run first in App::build.
DO $$
BEGIN
    IF to_regclass('recipient_state') IS NOT NULL THEN
        CREATE INDEX IF NOT EXISTS reconcile_recipient_updated
            ON recipient_state (source, updated_at);
    END IF;
    IF to_regclass('messages') IS NOT NULL THEN
        CREATE INDEX IF NOT EXISTS reconcile_messages_announced
            ON messages ((coalesce(queued_at, first_seen_at)))
            WHERE total_recipients IS NOT NULL;
    END IF;
END
$$;
