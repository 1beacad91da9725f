-- The deployment guide's monitoring views with its column names, and the archive that audit rows older than
-- the audit retention move to (weekly maintenance, tasks/maintenance.py). Every statement can run again.

-- refresh_success_rate (guide, Step 7): per table over the last 7 days. Success and warning are counted apart:
-- success_rate is the share of finished runs (success, warning, failed) that ended 'success'; a warning run is
-- in warning_rate. Skipped and running rows are counted but are not runs that ended, so not in the rates.
-- The view's columns changed (it had success_rate_pct over 30 days): CREATE OR REPLACE cannot rename columns,
-- and nothing is ever dropped with CASCADE (a user's view on it makes this fail loudly instead).
DROP VIEW IF EXISTS __SCHEMA__.refresh_success_rate;
CREATE VIEW __SCHEMA__.refresh_success_rate AS
SELECT table_schema,
       table_name,
       round(100.0 * count(*) FILTER (WHERE status = 'success')
             / NULLIF(count(*) FILTER (WHERE status IN ('success', 'warning', 'failed')), 0), 2) AS success_rate,
       round(avg(execution_time_ms) FILTER (WHERE status IN ('success', 'warning', 'failed')), 1)
           AS avg_execution_time_ms,
       max(refresh_completed_at) FILTER (WHERE status = 'success') AS last_successful_refresh,
       round(100.0 * count(*) FILTER (WHERE status = 'warning')
             / NULLIF(count(*) FILTER (WHERE status IN ('success', 'warning', 'failed')), 0), 2) AS warning_rate,
       round(100.0 * count(*) FILTER (WHERE status = 'failed')
             / NULLIF(count(*) FILTER (WHERE status IN ('success', 'warning', 'failed')), 0), 2) AS failure_rate,
       count(*) FILTER (WHERE status IN ('success', 'warning', 'failed')) AS total_runs,
       count(*) FILTER (WHERE status = 'success') AS success_count,
       count(*) FILTER (WHERE status = 'warning') AS warning_count,
       count(*) FILTER (WHERE status = 'failed') AS failed_count,
       count(*) FILTER (WHERE status = 'skipped') AS skipped_count,
       count(*) FILTER (WHERE status = 'running') AS running_count,
       max(refresh_completed_at) FILTER (WHERE status = 'warning') AS last_warning_refresh,
       max(refresh_completed_at) FILTER (WHERE status = 'failed') AS last_failed_refresh
  FROM __SCHEMA__.refresh_audit_log
 WHERE refresh_started_at > CURRENT_TIMESTAMP - INTERVAL '7 days'
 GROUP BY table_schema, table_name;

-- data_quality_overview (guide, Step 7): per check (metric_name) over the runs of the last 7 days.
-- A check whose outcome is unknown (is_within_threshold NULL) counts in total_checks, not as passed.
DROP VIEW IF EXISTS __SCHEMA__.data_quality_overview;
CREATE VIEW __SCHEMA__.data_quality_overview AS
SELECT dq.metric_name,
       round(100.0 * count(*) FILTER (WHERE dq.is_within_threshold) / count(*), 2) AS pass_rate,
       count(*) AS total_checks,
       count(*) FILTER (WHERE dq.is_within_threshold) AS passed_checks,
       count(*) FILTER (WHERE NOT dq.is_within_threshold) AS failed_checks,
       count(DISTINCT (al.table_schema, al.table_name)) AS tables_checked,
       max(dq.created_at) AS last_checked_at
  FROM __SCHEMA__.refresh_data_quality dq
  JOIN __SCHEMA__.refresh_audit_log al ON dq.audit_log_id = al.id
 WHERE al.refresh_started_at > CURRENT_TIMESTAMP - INTERVAL '7 days'
 GROUP BY dq.metric_name;

-- The same per table (what data_quality_overview showed before it took the guide's shape).
CREATE OR REPLACE VIEW __SCHEMA__.data_quality_by_table AS
SELECT al.table_schema,
       al.table_name,
       dq.metric_name,
       round(100.0 * count(*) FILTER (WHERE dq.is_within_threshold) / count(*), 2) AS pass_rate,
       count(*) AS total_checks,
       count(*) FILTER (WHERE dq.is_within_threshold) AS passed_checks,
       count(*) FILTER (WHERE NOT dq.is_within_threshold) AS failed_checks,
       max(dq.created_at) AS last_checked_at
  FROM __SCHEMA__.refresh_data_quality dq
  JOIN __SCHEMA__.refresh_audit_log al ON dq.audit_log_id = al.id
 WHERE al.refresh_started_at > CURRENT_TIMESTAMP - INTERVAL '7 days'
 GROUP BY al.table_schema, al.table_name, dq.metric_name;

-- The archive (guide, Maintenance: "Archive logs older than 90 days"). Same columns as the live tables, plus
-- archived_at; ids are kept, so a quality or quarantine row still names its audit row. The archive's foreign
-- keys point into the archive; refresh_config_id has none (a registry row may be removed later).
CREATE TABLE IF NOT EXISTS __SCHEMA__.refresh_audit_log_archive (
    id INTEGER PRIMARY KEY,
    refresh_config_id INTEGER,
    table_schema TEXT NOT NULL,
    table_name TEXT NOT NULL,
    refresh_started_at TIMESTAMP WITH TIME ZONE NOT NULL,
    refresh_completed_at TIMESTAMP WITH TIME ZONE,
    status TEXT,
    rows_processed BIGINT,
    rows_inserted BIGINT,
    rows_updated BIGINT,
    rows_deleted BIGINT,
    execution_time_ms INTEGER,
    memory_used_mb DECIMAL(10, 2),
    error_message TEXT,
    error_details JSONB,
    bigquery_job_id TEXT,
    sync_metadata JSONB,
    created_at TIMESTAMP WITH TIME ZONE,
    archived_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX IF NOT EXISTS idx_audit_archive_table
    ON __SCHEMA__.refresh_audit_log_archive (table_schema, table_name, refresh_started_at DESC);

CREATE TABLE IF NOT EXISTS __SCHEMA__.refresh_data_quality_archive (
    id INTEGER PRIMARY KEY,
    audit_log_id INTEGER REFERENCES __SCHEMA__.refresh_audit_log_archive (id) ON DELETE CASCADE,
    metric_name TEXT NOT NULL,
    metric_value DECIMAL,
    expected_value DECIMAL,
    threshold_min DECIMAL,
    threshold_max DECIMAL,
    is_within_threshold BOOLEAN,
    created_at TIMESTAMP WITH TIME ZONE,
    archived_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX IF NOT EXISTS idx_quality_archive_audit_id ON __SCHEMA__.refresh_data_quality_archive (audit_log_id);

CREATE TABLE IF NOT EXISTS __SCHEMA__.refresh_quarantine_archive (
    id BIGINT PRIMARY KEY,
    audit_log_id INTEGER REFERENCES __SCHEMA__.refresh_audit_log_archive (id) ON DELETE CASCADE,
    table_schema TEXT NOT NULL,
    table_name TEXT NOT NULL,
    reason TEXT NOT NULL,
    row_data JSONB NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE,
    archived_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX IF NOT EXISTS idx_quarantine_archive_audit_id ON __SCHEMA__.refresh_quarantine_archive (audit_log_id);

-- Indexes the retention deletes use (the alert log has one on created_at already).
CREATE INDEX IF NOT EXISTS idx_checkpoints_finished
    ON __SCHEMA__.refresh_checkpoints (updated_at) WHERE status IN ('completed', 'expired');
CREATE INDEX IF NOT EXISTS idx_mv_status_time
    ON __SCHEMA__.materialized_view_refresh_status (refresh_started_at);

-- Audit rows are archived now, never deleted: the function that deleted them goes.
DROP FUNCTION IF EXISTS __SCHEMA__.purge_audit_log(INTEGER);
