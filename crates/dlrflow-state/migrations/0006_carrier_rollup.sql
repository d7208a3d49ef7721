-- Carrier and error analytics (GET /v1/analytics/carriers, `dlrflow-state
-- carriers`): an incremental rollup the write path keeps in the same
-- transaction as the recipient rows (crates/dlrflow-state/src/carriers.rs).

-- Which terminal statuses a webhook (not the status API) ever reported for
-- the recipient: bit 1 delivered, bit 2 failed. A set of what the log holds,
-- so it is the same whatever the order of arrival (and after a rebuild). A
-- terminal status none of these bits covers came only from the status API.
ALTER TABLE recipient_state ADD COLUMN IF NOT EXISTS webhook_terminals smallint NOT NULL DEFAULT 0;

-- One row per (source, hour, carrier, error code, metric, bin): the sum of
-- every recipient's contribution. The write path subtracts a recipient's old
-- contribution and adds its new one with additive upserts (commutative, so
-- concurrent replicas need no coordination beyond the row locks). Counters
-- (`recipients`, `delivered`, `failed`, `status_api_only`) use bin 0; the
-- latency histograms (`sent_to_delivered`, `queued_to_terminal`) use log-scale
-- bins: bin 0 is under 1 ms, bin k >= 1 holds [2^((k-1)/4), 2^(k/4)) ms, the
-- last bin (127) is open-ended. `carrier` / `error_code` are '' when unknown /
-- none (the error code only for failed recipients). `hour` is the start of
-- the hour of the recipient's basis time (its message's queued time, else its
-- own, else its earliest status time, else its latest event time). A row may
-- reach n = 0 and stay: readers and the rebuild comparison ignore those.
CREATE TABLE IF NOT EXISTS carrier_rollup (
    source     text        NOT NULL,
    hour       timestamptz NOT NULL,
    carrier    text        NOT NULL,
    error_code text        NOT NULL,
    metric     text        NOT NULL CHECK (metric IN ('recipients', 'delivered', 'failed',
                                   'status_api_only', 'sent_to_delivered', 'queued_to_terminal')),
    bin        smallint    NOT NULL,
    n          bigint      NOT NULL,
    PRIMARY KEY (source, hour, carrier, error_code, metric, bin)
);

-- Backfill, so an existing state is reported whole from the start. The
-- same definitions as the write path (src/carriers.rs `contribute`); the
-- store test runs this file again on a written state and compares. One scan
-- of delivery_events and of recipient_state: on a large state, run it at a
-- quiet time (the services refuse to start until migrations are applied).
UPDATE recipient_state r SET webhook_terminals = w.bits
  FROM (SELECT message_id, recipient,
               bit_or(CASE status WHEN 'delivered' THEN 1 ELSE 2 END)::smallint AS bits
          FROM delivery_events
         WHERE provider <> 'status_api' AND status IN ('delivered', 'failed')
         GROUP BY message_id, recipient) w
 WHERE r.message_id = w.message_id AND r.recipient = w.recipient
   AND r.webhook_terminals <> w.bits;

-- The latency bin of b - a: 0 under 1 ms, else k with 2^(k-1) <= ms^4 < 2^k.
CREATE FUNCTION pg_temp.dlrflow_latency_bin(a timestamptz, b timestamptz) RETURNS smallint
LANGUAGE sql IMMUTABLE AS $$
  SELECT (CASE WHEN floor(extract(epoch FROM b - a) * 1000) < 1 THEN 0
               ELSE least(127, floor(log(2::numeric, floor(extract(epoch FROM b - a) * 1000) ^ 4)) + 1)
          END)::smallint
$$;

INSERT INTO carrier_rollup (source, hour, carrier, error_code, metric, bin, n)
SELECT c.source, c.hour, c.carrier, c.error_code, x.metric, x.bin, count(*)
  FROM (SELECT r.source,
               to_timestamp(floor(extract(epoch FROM coalesce(m.queued_at, r.queued_at,
                   least(r.processing_at, r.sent_at, r.delivered_at, r.failed_at),
                   r.last_event_at)) / 3600) * 3600) AS hour,
               left(coalesce(r.carrier, ''), 100) AS carrier,
               CASE WHEN r.status = 'failed' THEN left(coalesce(r.error_code, ''), 100) ELSE '' END AS error_code,
               r.status, r.sent_at, r.delivered_at, r.webhook_terminals,
               coalesce(m.queued_at, r.queued_at) AS q,
               CASE r.status WHEN 'delivered' THEN r.delivered_at WHEN 'failed' THEN r.failed_at END AS t
          FROM recipient_state r JOIN messages m USING (message_id)) c,
       LATERAL (VALUES
         ('recipients', 0::smallint, true),
         ('delivered', 0::smallint, c.status = 'delivered'),
         ('failed', 0::smallint, c.status = 'failed'),
         ('status_api_only', 0::smallint, c.status IN ('delivered', 'failed')
             AND c.webhook_terminals & (CASE c.status WHEN 'delivered' THEN 1 ELSE 2 END)::smallint = 0),
         ('sent_to_delivered', pg_temp.dlrflow_latency_bin(c.sent_at, c.delivered_at),
             c.status = 'delivered' AND c.sent_at IS NOT NULL AND c.delivered_at IS NOT NULL),
         ('queued_to_terminal', pg_temp.dlrflow_latency_bin(c.q, c.t),
             c.status IN ('delivered', 'failed') AND c.q IS NOT NULL AND c.t IS NOT NULL)
       ) AS x(metric, bin, yes)
 WHERE x.yes
 GROUP BY 1, 2, 3, 4, 5, 6
ON CONFLICT (source, hour, carrier, error_code, metric, bin)
DO UPDATE SET n = carrier_rollup.n + EXCLUDED.n;

DROP FUNCTION pg_temp.dlrflow_latency_bin(timestamptz, timestamptz);
