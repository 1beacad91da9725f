-- The refresh system's registry, audit log, dependencies, quality metrics and checkpoints
-- (spec: database-schema.md). __SCHEMA__ is replaced by the quoted schema name.
CREATE SCHEMA IF NOT EXISTS __SCHEMA__;

CREATE TABLE IF NOT EXISTS __SCHEMA__.refresh_config (
    id SERIAL PRIMARY KEY,
    table_schema TEXT NOT NULL,
    table_name TEXT NOT NULL,
    is_enabled BOOLEAN DEFAULT true,
    refresh_frequency_hours INTEGER DEFAULT 24 CHECK (refresh_frequency_hours > 0),
    priority INTEGER DEFAULT 100,
    last_refresh_at TIMESTAMP WITH TIME ZONE,
    next_refresh_at TIMESTAMP WITH TIME ZONE,
    custom_sync_params JSONB DEFAULT '{}',
    dependencies TEXT[] DEFAULT '{}',
    created_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP,
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP,
    UNIQUE (table_schema, table_name)
);
CREATE INDEX IF NOT EXISTS idx_refresh_config_next_refresh
    ON __SCHEMA__.refresh_config (next_refresh_at) WHERE is_enabled = true;
CREATE INDEX IF NOT EXISTS idx_refresh_config_priority
    ON __SCHEMA__.refresh_config (priority DESC) WHERE is_enabled = true;

CREATE TABLE IF NOT EXISTS __SCHEMA__.refresh_audit_log (
    id SERIAL PRIMARY KEY,
    refresh_config_id INTEGER REFERENCES __SCHEMA__.refresh_config (id) ON DELETE SET NULL,
    table_schema TEXT NOT NULL,
    table_name TEXT NOT NULL,
    refresh_started_at TIMESTAMP WITH TIME ZONE NOT NULL,
    refresh_completed_at TIMESTAMP WITH TIME ZONE,
    status TEXT CHECK (status IN ('running', 'success', 'failed', 'warning', 'skipped')),
    rows_processed BIGINT,
    rows_inserted BIGINT,
    rows_updated BIGINT,
    rows_deleted BIGINT,
    execution_time_ms INTEGER,
    memory_used_mb DECIMAL(10, 2),
    error_message TEXT,
    error_details JSONB,
    bigquery_job_id TEXT,
    sync_metadata JSONB DEFAULT '{}',
    created_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX IF NOT EXISTS idx_audit_log_status_time
    ON __SCHEMA__.refresh_audit_log (status, refresh_started_at DESC);
CREATE INDEX IF NOT EXISTS idx_audit_log_table
    ON __SCHEMA__.refresh_audit_log (table_schema, table_name, refresh_started_at DESC);
CREATE INDEX IF NOT EXISTS idx_audit_log_config_id
    ON __SCHEMA__.refresh_audit_log (refresh_config_id, refresh_started_at DESC);

CREATE TABLE IF NOT EXISTS __SCHEMA__.refresh_dependencies (
    id SERIAL PRIMARY KEY,
    parent_config_id INTEGER REFERENCES __SCHEMA__.refresh_config (id) ON DELETE CASCADE,
    dependent_config_id INTEGER REFERENCES __SCHEMA__.refresh_config (id) ON DELETE CASCADE,
    dependency_type TEXT DEFAULT 'hard' CHECK (dependency_type IN ('hard', 'soft')),
    created_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP,
    UNIQUE (parent_config_id, dependent_config_id),
    CHECK (parent_config_id <> dependent_config_id)
);
CREATE INDEX IF NOT EXISTS idx_dependencies_parent ON __SCHEMA__.refresh_dependencies (parent_config_id);
CREATE INDEX IF NOT EXISTS idx_dependencies_dependent ON __SCHEMA__.refresh_dependencies (dependent_config_id);

CREATE TABLE IF NOT EXISTS __SCHEMA__.refresh_data_quality (
    id SERIAL PRIMARY KEY,
    audit_log_id INTEGER REFERENCES __SCHEMA__.refresh_audit_log (id) ON DELETE CASCADE,
    metric_name TEXT NOT NULL,
    metric_value DECIMAL,
    expected_value DECIMAL,
    threshold_min DECIMAL,
    threshold_max DECIMAL,
    is_within_threshold BOOLEAN,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX IF NOT EXISTS idx_quality_audit_id ON __SCHEMA__.refresh_data_quality (audit_log_id);
CREATE INDEX IF NOT EXISTS idx_quality_threshold
    ON __SCHEMA__.refresh_data_quality (is_within_threshold, created_at DESC);

CREATE TABLE IF NOT EXISTS __SCHEMA__.refresh_checkpoints (
    id SERIAL PRIMARY KEY,
    function_name TEXT NOT NULL,
    table_schema TEXT NOT NULL,
    table_name TEXT NOT NULL,
    checkpoint_data JSONB NOT NULL,
    last_processed_row BIGINT,
    total_rows BIGINT,
    status TEXT CHECK (status IN ('active', 'completed', 'expired')),
    created_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP,
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP,
    expires_at TIMESTAMP WITH TIME ZONE DEFAULT (CURRENT_TIMESTAMP + INTERVAL '1 hour')
);
-- The spec's UNIQUE ... WHERE inside CREATE TABLE is not valid PostgreSQL: a partial unique index.
CREATE UNIQUE INDEX IF NOT EXISTS uq_checkpoints_one_active
    ON __SCHEMA__.refresh_checkpoints (function_name, table_schema, table_name) WHERE status = 'active';
CREATE INDEX IF NOT EXISTS idx_checkpoints_active
    ON __SCHEMA__.refresh_checkpoints (function_name, status) WHERE status = 'active';
CREATE INDEX IF NOT EXISTS idx_checkpoints_expired
    ON __SCHEMA__.refresh_checkpoints (expires_at) WHERE status = 'active';

CREATE OR REPLACE FUNCTION __SCHEMA__.update_refresh_config_timestamp()
RETURNS TRIGGER AS $$
BEGIN
    NEW.updated_at = CURRENT_TIMESTAMP;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS update_refresh_config_timestamp ON __SCHEMA__.refresh_config;
CREATE TRIGGER update_refresh_config_timestamp
BEFORE UPDATE ON __SCHEMA__.refresh_config
FOR EACH ROW EXECUTE FUNCTION __SCHEMA__.update_refresh_config_timestamp();

DROP TRIGGER IF EXISTS update_refresh_checkpoints_timestamp ON __SCHEMA__.refresh_checkpoints;
CREATE TRIGGER update_refresh_checkpoints_timestamp
BEFORE UPDATE ON __SCHEMA__.refresh_checkpoints
FOR EACH ROW EXECUTE FUNCTION __SCHEMA__.update_refresh_config_timestamp();

-- Expire active checkpoints past their expiry; returns how many were expired.
CREATE OR REPLACE FUNCTION __SCHEMA__.expire_checkpoints()
RETURNS INTEGER AS $$
DECLARE n INTEGER;
BEGIN
    UPDATE __SCHEMA__.refresh_checkpoints
       SET status = 'expired'
     WHERE status = 'active' AND expires_at < CURRENT_TIMESTAMP;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END;
$$ LANGUAGE plpgsql;

-- Purge audit rows (and their quality rows) older than the given number of days.
CREATE OR REPLACE FUNCTION __SCHEMA__.purge_audit_log(retention_days INTEGER DEFAULT 90)
RETURNS INTEGER AS $$
DECLARE n INTEGER;
BEGIN
    DELETE FROM __SCHEMA__.refresh_audit_log
     WHERE refresh_started_at < CURRENT_TIMESTAMP - make_interval(days => retention_days)
       AND status <> 'running';
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END;
$$ LANGUAGE plpgsql;

-- Monitoring views (spec: refresh_success_rate, data_quality_overview).
CREATE OR REPLACE VIEW __SCHEMA__.refresh_success_rate AS
SELECT table_schema,
       table_name,
       count(*) FILTER (WHERE status IN ('success', 'failed', 'warning')) AS total_runs,
       count(*) FILTER (WHERE status = 'success') AS successful_runs,
       count(*) FILTER (WHERE status = 'failed') AS failed_runs,
       round(100.0 * count(*) FILTER (WHERE status IN ('success', 'warning'))
             / NULLIF(count(*) FILTER (WHERE status IN ('success', 'failed', 'warning')), 0), 2)
           AS success_rate_pct,
       avg(execution_time_ms) FILTER (WHERE status IN ('success', 'warning')) AS avg_execution_time_ms,
       max(refresh_completed_at) FILTER (WHERE status IN ('success', 'warning')) AS last_success_at
  FROM __SCHEMA__.refresh_audit_log
 WHERE refresh_started_at > CURRENT_TIMESTAMP - INTERVAL '30 days'
 GROUP BY table_schema, table_name;

CREATE OR REPLACE VIEW __SCHEMA__.data_quality_overview AS
SELECT a.table_schema,
       a.table_name,
       q.metric_name,
       count(*) AS checks,
       count(*) FILTER (WHERE q.is_within_threshold) AS passed,
       count(*) FILTER (WHERE NOT q.is_within_threshold) AS failed,
       max(q.created_at) AS last_checked_at
  FROM __SCHEMA__.refresh_data_quality q
  JOIN __SCHEMA__.refresh_audit_log a ON a.id = q.audit_log_id
 WHERE q.created_at > CURRENT_TIMESTAMP - INTERVAL '30 days'
 GROUP BY a.table_schema, a.table_name, q.metric_name;

-- Materialized-view refresh status (one row per view refresh).
CREATE TABLE IF NOT EXISTS __SCHEMA__.materialized_view_refresh_status (
    id SERIAL PRIMARY KEY,
    view_schema TEXT NOT NULL,
    view_name TEXT NOT NULL,
    refresh_started_at TIMESTAMP WITH TIME ZONE NOT NULL,
    refresh_completed_at TIMESTAMP WITH TIME ZONE,
    duration_ms INTEGER,
    refreshed_concurrently BOOLEAN,
    status TEXT CHECK (status IN ('running', 'success', 'failed', 'skipped')),
    error_message TEXT,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX IF NOT EXISTS idx_mv_status_view
    ON __SCHEMA__.materialized_view_refresh_status (view_schema, view_name, refresh_started_at DESC);
