-- Fresh, or said so (issue 14): each table's age against its frequency, readable by dashboards, and the
-- episodes that alerts are sent once for. Every statement can run again.

-- Open alert episodes: a row while a table is stale ('stale') or its source was found not loaded
-- ('source_stale'); the alert goes out when the row is inserted, 'recovered' when it is deleted.
CREATE TABLE IF NOT EXISTS __SCHEMA__.refresh_episodes (
    table_schema TEXT NOT NULL,
    table_name TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('stale', 'source_stale')),
    opened_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT CURRENT_TIMESTAMP,
    details JSONB NOT NULL DEFAULT '{}'::jsonb,
    PRIMARY KEY (table_schema, table_name, kind)
);

-- refresh_freshness: one row per registered table. data_as_of is the BigQuery read snapshot of the last
-- successful publish (audit sync_metadata.data_as_of; rows written before it was recorded fall back to the
-- publish time); a table never refreshed is aged from its registration. is_stale uses the grace in the setting
-- bq_refresh.health_grace_hours (ALTER DATABASE ... SET bq_refresh.health_grace_hours = '2'; default 2), the
-- same rule as REFRESH_HEALTH_GRACE_HOURS. "rows" is PostgreSQL's live-row estimate of the target.
-- The view runs with its owner's rights: GRANT SELECT on it alone gives a dashboard role this and nothing of the
-- refresh system's own tables.
CREATE OR REPLACE VIEW __SCHEMA__.refresh_freshness AS
SELECT f.table_schema,
       f.table_name,
       f.is_enabled,
       f.frequency_hours,
       f.data_as_of,
       f.last_success,
       f.rows_read_last_success,
       f."rows",
       round((extract(epoch FROM CURRENT_TIMESTAMP - f.aged_from) / 3600)::numeric, 2) AS age_hours,
       f.frequency_hours + f.grace_hours AS stale_after_hours,
       f.is_enabled AND CURRENT_TIMESTAMP - f.aged_from
           > make_interval(secs => ((f.frequency_hours + f.grace_hours) * 3600)::double precision) AS is_stale
  FROM (
    SELECT c.table_schema,
           c.table_name,
           c.is_enabled,
           coalesce(c.refresh_frequency_hours, 24) AS frequency_hours,
           ok.data_as_of,
           ok.last_success,
           ok.rows_processed AS rows_read_last_success,
           st.n_live_tup AS "rows",
           coalesce(ok.data_as_of, ok.last_success, c.created_at) AS aged_from,
           coalesce(nullif(current_setting('bq_refresh.health_grace_hours', true), '')::numeric, 2) AS grace_hours
      FROM __SCHEMA__.refresh_config c
      LEFT JOIN LATERAL (
        SELECT a.refresh_completed_at AS last_success,
               (a.sync_metadata->>'data_as_of')::timestamptz AS data_as_of,
               a.rows_processed
          FROM __SCHEMA__.refresh_audit_log a
         WHERE a.table_schema = c.table_schema AND a.table_name = c.table_name
           AND (a.status IN ('success', 'warning') OR (a.status = 'failed' AND a.sync_metadata ? 'views_failed'))
           AND NOT coalesce((a.sync_metadata->>'dry_run')::boolean, false)
         ORDER BY a.id DESC
         LIMIT 1) ok ON true
      LEFT JOIN pg_stat_user_tables st
        ON st.schemaname = coalesce(split_part(c.custom_sync_params->>'target', '.', 1), c.table_schema)
       AND st.relname = coalesce(nullif(split_part(c.custom_sync_params->>'target', '.', 2), ''), c.table_name)
  ) f;
