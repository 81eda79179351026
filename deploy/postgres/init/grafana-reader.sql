-- The read-only role of Grafana's PostgreSQL data source, with exactly the grants dashboards/README.md lists.
-- Run after the migrations (the tables must exist), as the database owner, idempotently:
--   psql -v ON_ERROR_STOP=1 -v reader_password=… -f grafana-reader.sql
-- deploy/compose.yaml runs it in its one-shot `db-grants` service after `migrate`; the role name can be changed
-- with -v reader_role=… (the tests use a name of their own). Re-run it after a migration adds a table the
-- dashboards read.
\set ON_ERROR_STOP 1
\if :{?reader_password}
\else
  DO $$ BEGIN RAISE EXCEPTION 'reader_password is not set: psql -v reader_password=... -f grafana-reader.sql'; END $$;
\endif
\if :{?reader_role}
\else
  \set reader_role grafana_reader
\endif

SELECT format('CREATE ROLE %I LOGIN', :'reader_role')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'reader_role') \gexec

ALTER ROLE :"reader_role" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'reader_password';
ALTER ROLE :"reader_role" SET statement_timeout = '30s';
ALTER ROLE :"reader_role" SET default_transaction_read_only = on;

SELECT format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), :'reader_role') \gexec
GRANT USAGE ON SCHEMA public TO :"reader_role";
GRANT SELECT ON usage_hourly, reliability_hourly_model, errors_hourly, usage_events, rollup_state,
                rollup_dirty, model_prices, freshness_status, ingest_heartbeats TO :"reader_role";
