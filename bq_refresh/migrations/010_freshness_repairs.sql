-- refresh_freshness leaves out repair runs (bq-refresh verify --repair): a repair mends a few rows or periods
-- and is not a night, so its snapshot is not the table's freshness (a table whose nights fail stays stale
-- however often it is repaired). The view is 006's otherwise; CREATE OR REPLACE keeps its grants.
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
           AND NOT coalesce((a.sync_metadata->>'repair')::boolean, false)
         ORDER BY a.id DESC
         LIMIT 1) ok ON true
      LEFT JOIN pg_stat_user_tables st
        ON st.schemaname = coalesce(split_part(c.custom_sync_params->>'target', '.', 1), c.table_schema)
       AND st.relname = coalesce(nullif(split_part(c.custom_sync_params->>'target', '.', 2), ''), c.table_name)
  ) f;
