-- What the sync engine keeps between runs: the watermark and the last source schema per table,
-- and the quarantine where rows that cannot be published (NULL keys) are set aside.
ALTER TABLE __SCHEMA__.refresh_config ADD COLUMN IF NOT EXISTS watermark TEXT;
ALTER TABLE __SCHEMA__.refresh_config ADD COLUMN IF NOT EXISTS source_schema JSONB;

CREATE TABLE IF NOT EXISTS __SCHEMA__.refresh_quarantine (
    id BIGSERIAL PRIMARY KEY,
    audit_log_id INTEGER REFERENCES __SCHEMA__.refresh_audit_log (id) ON DELETE CASCADE,
    table_schema TEXT NOT NULL,
    table_name TEXT NOT NULL,
    reason TEXT NOT NULL,
    row_data JSONB NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX IF NOT EXISTS idx_quarantine_table
    ON __SCHEMA__.refresh_quarantine (table_schema, table_name, created_at DESC);
