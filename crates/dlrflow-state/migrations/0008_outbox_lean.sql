-- The outbox without its unique index on `update_id` (issue 13: a random
-- UUID index insert per change, about a fifth of the outbox row's cost).
-- It was a safety net only: the write path applies each dedupe key once
-- (`delivery_events` primary key, under the recipients' advisory locks),
-- and the stream is at-least-once anyway (a relay crash republishes), so
-- consumers dedupe on `update_id` whatever the outbox holds.
ALTER TABLE delivery_outbox DROP CONSTRAINT IF EXISTS delivery_outbox_update_id_key;
