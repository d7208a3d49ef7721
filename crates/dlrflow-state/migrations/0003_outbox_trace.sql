-- The trace context of the change an outbox row records (the raw record's
-- `traceparent`, or the reconcile job's): the relay writes it into the
-- dlrflow.delivery.v1 record's `traceparent` header, so an analytics
-- consumer continues the trace that began at the gateway's request.
ALTER TABLE delivery_outbox ADD COLUMN IF NOT EXISTS traceparent text;
