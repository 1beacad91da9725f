-- Runs started through the HTTP API, and per-table totals that only ever grow (issue 18).
--  * refresh_runs: the refresh system's own run id for a POST /trigger, answered at once and reported by
--    GET /runs/{id}. It lives here, not only in Prefect, because a local run's Prefect server is a temporary one
--    that goes away with `bq-refresh serve`. Written by tasks/runs.py only.
--  * refresh_totals: per table, the runs, failures and rows ever counted, for Prometheus counters that never go
--    down. Kept by a trigger on the audit log when a row finishes (or later turns failed), so moving audit rows to
--    the archive, or deleting them, changes no total. Dry runs publish nothing and are not counted. Seeded once
--    from the audit log and its archive.
-- Both are closed to the Data API roles as migration 007 closes the other system tables. Every statement can
-- run again.
CREATE TABLE IF NOT EXISTS __SCHEMA__.refresh_runs (
    id UUID PRIMARY KEY,
    status TEXT NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'running', 'success', 'failed', 'interrupted', 'cancelled')),
    mode TEXT NOT NULL CHECK (mode IN ('local', 'deployment')),
    parameters JSONB NOT NULL DEFAULT '{}',
    tables TEXT[] NOT NULL DEFAULT '{}',
    requested_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT now(),
    started_at TIMESTAMP WITH TIME ZONE,
    finished_at TIMESTAMP WITH TIME ZONE,
    heartbeat_at TIMESTAMP WITH TIME ZONE,
    flow_run_id TEXT,
    deployment TEXT,
    served_by TEXT,
    outcomes JSONB,
    error TEXT
);
CREATE INDEX IF NOT EXISTS idx_refresh_runs_active
    ON __SCHEMA__.refresh_runs (requested_at) WHERE status IN ('queued', 'running');

CREATE TABLE IF NOT EXISTS __SCHEMA__.refresh_totals (
    table_schema TEXT NOT NULL,
    table_name TEXT NOT NULL,
    runs BIGINT NOT NULL DEFAULT 0,
    successes BIGINT NOT NULL DEFAULT 0,
    failures BIGINT NOT NULL DEFAULT 0,
    skipped BIGINT NOT NULL DEFAULT 0,
    rows_read BIGINT NOT NULL DEFAULT 0,
    rows_inserted BIGINT NOT NULL DEFAULT 0,
    rows_updated BIGINT NOT NULL DEFAULT 0,
    rows_deleted BIGINT NOT NULL DEFAULT 0,
    run_seconds DOUBLE PRECISION NOT NULL DEFAULT 0,
    last_success_at TIMESTAMP WITH TIME ZONE,
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT now(),
    PRIMARY KEY (table_schema, table_name)
);

-- SECURITY DEFINER: a least-privilege refresh role made before this migration writes audit rows but was granted
-- nothing on refresh_totals; the totals are written with the rights of the schema's owner, and only by this.
CREATE OR REPLACE FUNCTION __SCHEMA__.refresh_count_totals()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $bqr$
DECLARE
    first_finish boolean := NEW.status IS NOT NULL AND NEW.status <> 'running'
        AND (TG_OP = 'INSERT' OR OLD.status IS NULL OR OLD.status = 'running');
    turned_failed boolean := NEW.status = 'failed' AND (TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM 'failed');
BEGIN
    IF coalesce((NEW.sync_metadata->>'dry_run')::boolean, false) OR NOT (first_finish OR turned_failed) THEN
        RETURN NULL;
    END IF;
    INSERT INTO __SCHEMA__.refresh_totals AS t (table_schema, table_name, runs, successes, failures, skipped,
            rows_read, rows_inserted, rows_updated, rows_deleted, run_seconds, last_success_at)
    VALUES (NEW.table_schema, NEW.table_name,
            CASE WHEN first_finish AND NEW.status <> 'skipped' THEN 1 ELSE 0 END,
            CASE WHEN first_finish AND NEW.status IN ('success', 'warning') THEN 1 ELSE 0 END,
            CASE WHEN turned_failed THEN 1 ELSE 0 END,
            CASE WHEN first_finish AND NEW.status = 'skipped' THEN 1 ELSE 0 END,
            CASE WHEN first_finish THEN coalesce(NEW.rows_processed, 0) ELSE 0 END,
            CASE WHEN first_finish THEN coalesce(NEW.rows_inserted, 0) ELSE 0 END,
            CASE WHEN first_finish THEN coalesce(NEW.rows_updated, 0) ELSE 0 END,
            CASE WHEN first_finish THEN coalesce(NEW.rows_deleted, 0) ELSE 0 END,
            CASE WHEN first_finish THEN coalesce(NEW.execution_time_ms, 0) / 1000.0 ELSE 0 END,
            CASE WHEN first_finish AND NEW.status IN ('success', 'warning') THEN NEW.refresh_completed_at END)
    ON CONFLICT (table_schema, table_name) DO UPDATE
       SET runs = t.runs + excluded.runs, successes = t.successes + excluded.successes,
           failures = t.failures + excluded.failures, skipped = t.skipped + excluded.skipped,
           rows_read = t.rows_read + excluded.rows_read, rows_inserted = t.rows_inserted + excluded.rows_inserted,
           rows_updated = t.rows_updated + excluded.rows_updated, rows_deleted = t.rows_deleted + excluded.rows_deleted,
           run_seconds = t.run_seconds + excluded.run_seconds,
           last_success_at = greatest(t.last_success_at, excluded.last_success_at), updated_at = now();
    RETURN NULL;
END
$bqr$;

DO $bqr$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_trigger WHERE tgname = 'refresh_count_totals'
                      AND tgrelid = to_regclass(format('%I.%I', __SCHEMA_LITERAL__, 'refresh_audit_log'))) THEN
        -- Seeded in the same transaction as the trigger is made: no finished row is counted twice or missed.
        INSERT INTO __SCHEMA__.refresh_totals (table_schema, table_name, runs, successes, failures, skipped,
                rows_read, rows_inserted, rows_updated, rows_deleted, run_seconds, last_success_at)
        SELECT table_schema, table_name,
               count(*) FILTER (WHERE status <> 'skipped'),
               count(*) FILTER (WHERE status IN ('success', 'warning')),
               count(*) FILTER (WHERE status = 'failed'),
               count(*) FILTER (WHERE status = 'skipped'),
               coalesce(sum(rows_processed), 0), coalesce(sum(rows_inserted), 0),
               coalesce(sum(rows_updated), 0), coalesce(sum(rows_deleted), 0),
               coalesce(sum(execution_time_ms), 0) / 1000.0,
               max(refresh_completed_at) FILTER (WHERE status IN ('success', 'warning'))
          FROM (SELECT table_schema, table_name, status, rows_processed, rows_inserted, rows_updated, rows_deleted,
                       execution_time_ms, refresh_completed_at, sync_metadata FROM __SCHEMA__.refresh_audit_log
                UNION ALL
                SELECT table_schema, table_name, status, rows_processed, rows_inserted, rows_updated, rows_deleted,
                       execution_time_ms, refresh_completed_at, sync_metadata FROM __SCHEMA__.refresh_audit_log_archive) a
         WHERE status IS NOT NULL AND status <> 'running'
           AND NOT coalesce((sync_metadata->>'dry_run')::boolean, false)
         GROUP BY table_schema, table_name
        ON CONFLICT (table_schema, table_name) DO NOTHING;
        CREATE TRIGGER refresh_count_totals AFTER INSERT OR UPDATE OF status ON __SCHEMA__.refresh_audit_log
            FOR EACH ROW EXECUTE FUNCTION __SCHEMA__.refresh_count_totals();
    END IF;
END
$bqr$;

-- Closed as in migration 007: nothing granted to PUBLIC, anon or authenticated (Supabase's default privileges on
-- an exposed schema grant them every new table and function), row-level security on without a policy for them.
DO $bqr$
DECLARE
    reg CONSTANT text := __SCHEMA_LITERAL__;
    grantees text[] := ARRAY['PUBLIC'] || ARRAY(
        SELECT quote_ident(rolname) FROM pg_roles WHERE rolname IN ('anon', 'authenticated') ORDER BY rolname);
    grantee text;
    rel text;
    pol text;
BEGIN
    FOREACH rel IN ARRAY ARRAY['refresh_runs', 'refresh_totals'] LOOP
        FOREACH grantee IN ARRAY grantees LOOP
            EXECUTE format('REVOKE ALL ON TABLE %I.%I FROM %s', reg, rel, grantee);
        END LOOP;
        EXECUTE format('ALTER TABLE %I.%I ENABLE ROW LEVEL SECURITY', reg, rel);
        FOR pol IN
            SELECT p.polname FROM pg_policy p
             WHERE p.polrelid = format('%I.%I', reg, rel)::regclass
               AND (0 = ANY(p.polroles) OR EXISTS (SELECT FROM pg_roles r WHERE r.oid = ANY(p.polroles)
                                                      AND r.rolname IN ('anon', 'authenticated')))
        LOOP
            EXECUTE format('DROP POLICY %I ON %I.%I', pol, reg, rel);
        END LOOP;
    END LOOP;
    FOREACH grantee IN ARRAY grantees LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %I.refresh_count_totals() FROM %s', reg, grantee);
    END LOOP;
END
$bqr$;
