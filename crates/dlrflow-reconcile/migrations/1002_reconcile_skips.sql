-- Jobs closed without a read because, re-checked right before the read, the
-- message no longer met its trigger (the webhooks settled it while the job
-- waited) or dlrflow-state lagged past the deadline (the answer may already be
-- in Kafka). Counted per job; such a close leaves `last_read_at` alone, so
-- the sweep opens the job again if the message is still unsettled later.
ALTER TABLE reconcile_jobs ADD COLUMN IF NOT EXISTS skipped integer NOT NULL DEFAULT 0;
