-- Tags on registered tables (issue 18): `bq-refresh run --select tag:NAME` picks the tables that carry NAME, as
-- dbt's tag: selector does; set with `bq-refresh tables add/set --tag`, or in a tables file (bq-refresh apply).
-- Every statement can run again.
ALTER TABLE __SCHEMA__.refresh_config ADD COLUMN IF NOT EXISTS tags TEXT[] NOT NULL DEFAULT '{}';
