-- Where each partition of the raw topic stands, written by dlrflow-state at
-- every lag check (`health.lag_check_interval_ms`): every record the ingest
-- received before `caught_up_to` is in the state (NULL: not known yet, the
-- partition has records behind and none was written since the consumer
-- started and no earlier bound is known). dlrflow-reconcile reads how old
-- the oldest record possibly not yet in the state is (`now() - min(caught_up_to)`,
-- and `now() - observed_at` at least, for a consumer that stopped writing):
-- while that is older than a status deadline, it opens no `stuck` job for
-- that status and reads no job that would only be premature.
CREATE TABLE IF NOT EXISTS consumer_progress (
    group_id     text        NOT NULL,
    topic        text        NOT NULL,
    partition    int         NOT NULL,
    caught_up_to timestamptz,
    lag_records  bigint      NOT NULL,
    observed_at  timestamptz NOT NULL,
    PRIMARY KEY (group_id, topic, partition)
);
