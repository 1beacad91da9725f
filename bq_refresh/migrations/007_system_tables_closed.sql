-- The refresh system's own tables are not open to dashboard users (issue 17). Supabase's Data API serves every
-- schema it exposes to the roles anon and authenticated, and its recipe for exposing a schema grants them ALL on
-- ALL TABLES in it (plus default privileges for tables created later). The registry holds BigQuery SQL run with
-- the agency's service account; the audit log, alerts and quarantine hold errors and rows. So:
--  1. nothing of it is granted to PUBLIC, anon or authenticated (when those roles exist): tables, their
--     sequences, the monitoring views (a dashboard role gets SELECT on the views it reads, see docs/operations.md)
--     and the functions;
--  2. row-level security is enabled on every system table, with no policy for those roles (one found there, for
--     them or for PUBLIC, e.g. from a script that gave every table in the schema a read policy, is dropped): if a
--     later "GRANT ALL ON ALL TABLES IN SCHEMA ... TO anon" opens them again, anon still reads and writes no row.
--     The owner (the role that runs init, usually the refresh's own) is exempt (not FORCEd); a least-privilege
--     refresh role gets a policy of its own from `bq-refresh role-sql`. The views run with their owner's rights,
--     so a role granted SELECT on refresh_freshness reads it whole and nothing of the tables under it;
--  3. the staging schema exists from init on, closed: no USAGE or CREATE for anyone but its owner, so no table
--     a run stages there is reachable whatever its own grants.
-- Every statement can run again.
DO $bqr$
DECLARE
    reg CONSTANT text := __SCHEMA_LITERAL__;
    system_tables CONSTANT text[] := ARRAY[
        'schema_migrations', 'refresh_config', 'refresh_audit_log', 'refresh_dependencies', 'refresh_data_quality',
        'refresh_checkpoints', 'materialized_view_refresh_status', 'refresh_quarantine', 'refresh_alerts',
        'refresh_audit_log_archive', 'refresh_data_quality_archive', 'refresh_quarantine_archive', 'refresh_episodes'];
    monitoring_views CONSTANT text[] := ARRAY[
        'refresh_success_rate', 'data_quality_overview', 'data_quality_by_table', 'refresh_freshness'];
    grantees text[] := ARRAY['PUBLIC'] || ARRAY(
        SELECT quote_ident(rolname) FROM pg_roles WHERE rolname IN ('anon', 'authenticated') ORDER BY rolname);
    grantee text;
    rel text;
    seq regclass;
    fn regprocedure;
    pol text;
BEGIN
    FOREACH rel IN ARRAY system_tables || monitoring_views LOOP
        CONTINUE WHEN to_regclass(format('%I.%I', reg, rel)) IS NULL;
        FOREACH grantee IN ARRAY grantees LOOP
            EXECUTE format('REVOKE ALL ON TABLE %I.%I FROM %s', reg, rel, grantee);
        END LOOP;
    END LOOP;
    FOREACH rel IN ARRAY system_tables LOOP
        CONTINUE WHEN to_regclass(format('%I.%I', reg, rel)) IS NULL;
        EXECUTE format('ALTER TABLE %I.%I ENABLE ROW LEVEL SECURITY', reg, rel);
        FOR pol IN
            SELECT p.polname FROM pg_policy p
             WHERE p.polrelid = format('%I.%I', reg, rel)::regclass
               AND (0 = ANY(p.polroles) OR EXISTS (SELECT FROM pg_roles r WHERE r.oid = ANY(p.polroles)
                                                      AND r.rolname IN ('anon', 'authenticated')))
        LOOP
            EXECUTE format('DROP POLICY %I ON %I.%I', pol, reg, rel);
        END LOOP;
        FOR seq IN
            SELECT d.objid::regclass FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
             WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
               AND d.refobjid = format('%I.%I', reg, rel)::regclass AND d.deptype IN ('a', 'i')
        LOOP
            FOREACH grantee IN ARRAY grantees LOOP
                EXECUTE format('REVOKE ALL ON SEQUENCE %s FROM %s', seq, grantee);
            END LOOP;
        END LOOP;
    END LOOP;
    FOR fn IN
        SELECT p.oid::regprocedure FROM pg_proc p
         WHERE p.pronamespace = (SELECT oid FROM pg_namespace WHERE nspname = reg)
           AND p.proname IN ('expire_checkpoints', 'update_refresh_config_timestamp', 'auto_register_table_for_refresh')
    LOOP
        FOREACH grantee IN ARRAY grantees LOOP
            EXECUTE format('REVOKE ALL ON FUNCTION %s FROM %s', fn, grantee);
        END LOOP;
    END LOOP;
END
$bqr$;

DO $bqr$
DECLARE
    staging CONSTANT text := __STAGING_LITERAL__;
    grantee text;
BEGIN
    IF staging = __SCHEMA_LITERAL__ THEN
        RETURN;  -- staging in the registry's own schema (not advised): that schema is the dashboards' too
    END IF;
    IF NOT EXISTS (SELECT FROM pg_namespace WHERE nspname = staging) THEN
        EXECUTE format('CREATE SCHEMA %I', staging);
    END IF;
    FOREACH grantee IN ARRAY ARRAY['PUBLIC'] || ARRAY(
            SELECT quote_ident(rolname) FROM pg_roles WHERE rolname IN ('anon', 'authenticated') ORDER BY rolname)
    LOOP
        EXECUTE format('REVOKE ALL ON SCHEMA %I FROM %s', staging, grantee);
    END LOOP;
END
$bqr$;
