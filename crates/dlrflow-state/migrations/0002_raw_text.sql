-- `delivery_events.raw` holds the record exactly as received. jsonb refuses
-- JSON that is valid but not representable in jsonb (a lone UTF-16 surrogate
-- escape, `\u0000`, numbers past numeric's range), and one such record used to
-- fail its whole batch; text accepts every record the parser accepts.
ALTER TABLE delivery_events ALTER COLUMN raw TYPE text USING raw::text;
