-- Every alert bq-refresh tried to send, delivered or not (an undeliverable alert is recorded, never lost).
CREATE TABLE IF NOT EXISTS __SCHEMA__.refresh_alerts (
    id BIGSERIAL PRIMARY KEY,
    event TEXT NOT NULL,
    table_schema TEXT,
    table_name TEXT,
    flow_run_id TEXT,
    channel TEXT NOT NULL,              -- webhook host or notification block name (never a full URL)
    status TEXT NOT NULL CHECK (status IN ('delivered', 'undelivered')),
    attempts INTEGER NOT NULL,
    last_error TEXT,
    payload JSONB NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX IF NOT EXISTS idx_alerts_time ON __SCHEMA__.refresh_alerts (created_at DESC);
CREATE INDEX IF NOT EXISTS idx_alerts_undelivered ON __SCHEMA__.refresh_alerts (status, created_at DESC)
    WHERE status = 'undelivered';
