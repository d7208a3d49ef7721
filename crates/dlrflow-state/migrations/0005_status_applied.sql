-- When the state last applied a status-API answer (dlrflow.status.v1) to a
-- message: the transaction time, equal to the `updated_at` of every
-- recipient row that answer changed. dlrflow-reconcile's triggers compare a
-- recipient's `updated_at` with it, so the answer's own write is never taken
-- for a new change that needs another read.
ALTER TABLE messages ADD COLUMN IF NOT EXISTS status_applied_at timestamptz;
