"""Maintenance: checkpoint expiry, audit retention, orphaned staging, discovery of new BigQuery tables."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from blocks import BigQuerySource
from bq_refresh.settings import Settings
from flows.maintenance import maintenance_flow
from tasks.migrations import apply_migrations
from tasks.registry import register_table
from tests.bqdata import put_table
from tests.test_engine import SQP_KEY, SQP_SCHEMA, sqp_rows

pytestmark = [pytest.mark.emulator, pytest.mark.usefixtures("prefect_harness")]


def test_maintenance_cleans_up_and_discovers(env: Settings, pg: psycopg.Connection[Any]) -> None:
    schema, staging = env.schema_name, env.staging_schema
    apply_migrations(pg, schema)
    source = BigQuerySource.from_settings(env)
    put_table(source, "known", SQP_SCHEMA, sqp_rows(3))
    put_table(source, "brand_new", SQP_SCHEMA, sqp_rows(3))
    register_table(pg, schema, "known", {"source": "known", "key": SQP_KEY, "cursor": "updated_at"})
    pg.execute(f'CREATE SCHEMA IF NOT EXISTS "{staging}"')
    pg.execute(f'CREATE TABLE "{staging}".orphan__12345678 (id int)')
    pg.execute(f'INSERT INTO "{schema}".refresh_checkpoints (function_name, table_schema, table_name,'
               " checkpoint_data, status, expires_at) VALUES ('refresh_table', 's', 't', '{}', 'active', now() - interval '1 hour')")
    pg.execute(f'INSERT INTO "{schema}".refresh_audit_log (table_schema, table_name, refresh_started_at, status)'
               " VALUES ('s', 'old', now() - interval '100 days', 'success'), ('s', 'new', now(), 'success')")

    report = maintenance_flow(retention_days=90)
    assert report == {"checkpoints_expired": 1, "audit_rows_purged": 1,
                      "staging_tables_dropped": ["orphan__12345678"], "tables_discovered": ["brand_new"]}
    row = pg.execute(f'SELECT is_enabled, custom_sync_params->>\'source\' FROM "{schema}".refresh_config'
                     " WHERE table_name = 'brand_new'").fetchone()
    assert row == (False, f"{env.bigquery_dataset}.brand_new")
    assert maintenance_flow(retention_days=90)["tables_discovered"] == []
