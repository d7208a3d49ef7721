-- A job whose answer could not be written for good (a permanent PostgreSQL
-- error): closed at once with `failed`, its error in `last_error`; only a new
-- trigger reopens it.
ALTER TABLE reconcile_jobs ADD COLUMN IF NOT EXISTS failed boolean NOT NULL DEFAULT false;

-- Budgets (`{redis.prefix}:{key_id}`) used with this database. When the
-- limiter's state is missing from Redis, a budget listed here was used
-- before: Redis lost its log of recent reads, so every replica waits one
-- window before reading again. A budget not listed is new and starts at once.
CREATE TABLE IF NOT EXISTS reconcile_budgets (
    name       text PRIMARY KEY,
    first_used timestamptz NOT NULL DEFAULT now()
);
