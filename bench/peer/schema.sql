-- The peer's schema for python -m bench.three_way (bench-only, not a migration; applied to the bench database
-- by the harness on every run, idempotent). PostGraphile exposes this schema and nothing else: a view over
-- usage_hourly_model and a SETOF function answering the benchmark's question, the same rows as the floor's
-- SELECT (org_id = org AND hour >= since; usage_hourly_model holds no hour at or above the rollup watermark).
CREATE SCHEMA IF NOT EXISTS peer;

CREATE OR REPLACE VIEW peer.usage_hourly_model AS
SELECT org_id, hour, model, requests, input_tokens, cached_input_tokens, output_tokens
FROM public.usage_hourly_model;

CREATE OR REPLACE FUNCTION peer.usage_since(org text, since timestamptz)
RETURNS SETOF peer.usage_hourly_model
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT org_id, hour, model, requests, input_tokens, cached_input_tokens, output_tokens
    FROM public.usage_hourly_model
    WHERE org_id = org AND hour >= since
    ORDER BY hour, model
$$;
