"""Cutover from the earlier sync: `bq-refresh init` stops, changing nothing, when the schema holds another tool's
tables with the names of bq-refresh's own; renamed away, init goes on and leaves them as they were."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from bq_refresh.errors import ConfigError
from tasks.migrations import Shape, apply_migrations, load_migrations, shape_differences
from tests.conftest import ROOT

# The earlier attempt's migration 031 is not in the spec (only its table names are, in the recap): this is a
# stand-in of its kind, its audit log keyed by uuid with its own columns, beside its registry and checkpoint tables
# (whose names bq-refresh does not use) and a table the dashboards read.
EARLIER_SYNC = """
CREATE TABLE {s}.refresh_table_registry (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(), schema_name text NOT NULL DEFAULT 'sqp', table_name text NOT NULL,
    is_enabled boolean DEFAULT true, priority integer DEFAULT 50, last_refresh_at timestamptz,
    UNIQUE (schema_name, table_name));
CREATE TABLE {s}.refresh_audit_log (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(), function_name text NOT NULL, table_name text NOT NULL,
    refresh_started_at timestamptz NOT NULL DEFAULT now(), refresh_completed_at timestamptz,
    status text CHECK (status IN ('running', 'success', 'failed')), rows_processed integer, error_message text);
CREATE TABLE {s}.refresh_checkpoint (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(), table_name text NOT NULL, last_offset integer, data jsonb);
CREATE TABLE {s}.asin_performance_data (start_date date, asin text, impressions bigint, PRIMARY KEY (start_date, asin));
INSERT INTO {s}.refresh_table_registry (table_name) VALUES ('asin_performance_data');
INSERT INTO {s}.refresh_audit_log (function_name, table_name, status, rows_processed)
    VALUES ('refresh-asin-performance', 'asin_performance_data', 'success', 1234);
INSERT INTO {s}.refresh_checkpoint (table_name, last_offset) VALUES ('asin_performance_data', 5000);
INSERT INTO {s}.asin_performance_data VALUES ('2025-01-05', 'B000000001', 10);
"""


def snapshot(pg: psycopg.Connection[Any], *schemas: str) -> dict[str, Any]:
    """Everything init could change in the schemas: relations, their columns, constraints, policies, ACLs, rows."""
    rels = pg.execute(
        "SELECT n.nspname, c.relname, c.relkind, c.relrowsecurity, c.relacl::text FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = ANY(%s) ORDER BY 1, 2", (list(schemas),)).fetchall()
    cols = pg.execute(
        "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull FROM pg_attribute a"
        " JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = ANY(%s) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY 1, 2", (list(schemas),)).fetchall()
    cons = pg.execute("SELECT conname, pg_get_constraintdef(k.oid) FROM pg_constraint k JOIN pg_namespace n"
                      " ON n.oid = k.connamespace WHERE n.nspname = ANY(%s) ORDER BY 1", (list(schemas),)).fetchall()
    rows = {f"{s}.{r}": pg.execute(sql.SQL("SELECT t::text FROM {} t ORDER BY 1").format(sql.Identifier(s, r))).fetchall()
            for s, r, kind, *_ in rels if kind == "r"}
    spaces = pg.execute("SELECT nspname FROM pg_namespace WHERE nspname = ANY(%s) ORDER BY 1", (list(schemas),)).fetchall()
    return {"schemas": spaces, "relations": rels, "columns": cols, "constraints": cons, "rows": rows}


def test_init_stops_at_the_earlier_syncs_tables_and_goes_on_once_they_are_renamed(
    pg: psycopg.Connection[Any], pg_uri: str, schema: str, tmp_path: Path,
) -> None:
    staging = f"{schema}_staging"
    pg.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    pg.execute(EARLIER_SYNC.format(s=sql.Identifier(schema).as_string(pg)).encode())
    before = snapshot(pg, schema, staging)

    with pytest.raises(ConfigError) as stopped:
        apply_migrations(pg, schema, staging)
    message = str(stopped.value)
    assert f"{schema}.refresh_audit_log: missing columns refresh_config_id, table_schema, rows_inserted" in message
    assert "other types: id uuid (bq-refresh's: integer), rows_processed integer (bq-refresh's: bigint)" in message
    assert "NOT NULL without a default, which bq-refresh does not fill: function_name" in message
    assert "CHECK ((status = ANY (ARRAY['running'::text, 'success'::text, 'failed'::text])))" in message
    assert f"Nothing was changed. Rename it away (ALTER TABLE {schema}.refresh_audit_log RENAME TO" in message
    assert "BQ_REFRESH_SCHEMA=" in message
    for kept in ("refresh_table_registry", "refresh_checkpoint", "asin_performance_data"):  # not bq-refresh's names
        assert f"{schema}.{kept}" not in message
    assert snapshot(pg, schema, staging) == before

    # The command line says the same in one line and exits 2 (configuration).
    env = {**os.environ, "BQ_REFRESH_DATABASE_URL": pg_uri, "BQ_REFRESH_SCHEMA": schema,
           "BQ_REFRESH_STAGING_SCHEMA": staging, "BQ_REFRESH_STATE_DIR": str(tmp_path), "COLUMNS": "400"}
    cli = subprocess.run([str(ROOT / ".venv" / "bin" / "bq-refresh"), "init"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 2 and f"{schema}.refresh_audit_log: missing columns" in cli.stderr, cli.stderr
    assert "Traceback" not in cli.stderr
    assert snapshot(pg, schema, staging) == before

    # As the message says: rename it away, and init goes on; the earlier sync's tables stay as they were.
    pg.execute(sql.SQL("ALTER TABLE {} RENAME TO refresh_audit_log_earlier").format(
        sql.Identifier(schema, "refresh_audit_log")))
    renamed = snapshot(pg, schema)
    report = apply_migrations(pg, schema, staging)
    assert report.applied == [m.name for m in load_migrations()]
    after = snapshot(pg, schema)
    earlier = ("refresh_table_registry", "refresh_checkpoint", "refresh_audit_log_earlier", "asin_performance_data")
    for name in earlier:
        assert after["rows"][f"{schema}.{name}"] == renamed["rows"][f"{schema}.{name}"]
        assert [c for c in after["columns"] if c[0] == name] == [c for c in renamed["columns"] if c[0] == name]
        assert [r for r in after["relations"] if r[1] == name] == [r for r in renamed["relations"] if r[1] == name]
    ours = {c[1]: c[2] for c in after["columns"] if c[0] == "refresh_audit_log"}
    assert ours["id"] == "integer" and ours["rows_processed"] == "bigint" and "function_name" not in ours
    assert apply_migrations(pg, schema, staging).applied == []


# The spec's own DDL (database-schema.md), as an earlier attempt following it would have created it: close to
# bq-refresh's but not the same (INTEGER counts, a status CHECK without 'skipped', no ON DELETE CASCADE).
SPEC_SHAPED = """
CREATE TABLE {s}.refresh_config (
    id SERIAL PRIMARY KEY, table_schema TEXT NOT NULL, table_name TEXT NOT NULL, is_enabled BOOLEAN DEFAULT true,
    refresh_frequency_hours INTEGER DEFAULT 24, priority INTEGER DEFAULT 100,
    last_refresh_at TIMESTAMP WITH TIME ZONE, next_refresh_at TIMESTAMP WITH TIME ZONE,
    custom_sync_params JSONB DEFAULT '{{}}', dependencies TEXT[] DEFAULT '{{}}',
    created_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP, updated_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP,
    UNIQUE(table_schema, table_name));
CREATE TABLE {s}.refresh_audit_log (
    id SERIAL PRIMARY KEY, refresh_config_id INTEGER REFERENCES {s}.refresh_config(id),
    table_schema TEXT NOT NULL, table_name TEXT NOT NULL,
    refresh_started_at TIMESTAMP WITH TIME ZONE NOT NULL, refresh_completed_at TIMESTAMP WITH TIME ZONE,
    status TEXT CHECK (status IN ('running', 'success', 'failed', 'warning')),
    rows_processed INTEGER, rows_inserted INTEGER, rows_updated INTEGER, rows_deleted INTEGER,
    execution_time_ms INTEGER, memory_used_mb DECIMAL(10,2), error_message TEXT, error_details JSONB,
    bigquery_job_id TEXT, sync_metadata JSONB DEFAULT '{{}}', created_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE {s}.refresh_data_quality (
    id SERIAL PRIMARY KEY, audit_log_id INTEGER REFERENCES {s}.refresh_audit_log(id), metric_name TEXT NOT NULL,
    metric_value DECIMAL, expected_value DECIMAL, threshold_min DECIMAL, threshold_max DECIMAL,
    is_within_threshold BOOLEAN, created_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP);
"""


def test_the_specs_own_shape_is_not_taken_for_bq_refreshs(pg: psycopg.Connection[Any], schema: str) -> None:
    pg.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    pg.execute(SPEC_SHAPED.format(s=sql.Identifier(schema).as_string(pg)).encode())
    before = snapshot(pg, schema)
    with pytest.raises(ConfigError) as stopped:
        apply_migrations(pg, schema)
    message = str(stopped.value)
    assert (f"{schema}.refresh_audit_log: other types: rows_processed integer (bq-refresh's: bigint), rows_inserted"
            in message)
    assert "'warning'::text]))) is not bq-refresh's" in message  # its status CHECK refuses 'skipped'
    assert f"{schema}.refresh_config: lacks CHECK ((refresh_frequency_hours > 0))" in message
    assert f"{schema}.refresh_data_quality: " in message and "ON DELETE CASCADE" in message
    assert "Rename them away" in message
    assert snapshot(pg, schema) == before


def test_a_migrations_record_of_another_tool_stops_init(pg: psycopg.Connection[Any], schema: str) -> None:
    pg.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    pg.execute(sql.SQL("CREATE TABLE {} (id serial PRIMARY KEY, filename text NOT NULL)").format(
        sql.Identifier(schema, "schema_migrations")))
    with pytest.raises(ConfigError, match=rf"{schema}\.schema_migrations: missing columns version, name, checksum,"
                                          r" applied_at.*NOT NULL without a default.*: filename"):
        apply_migrations(pg, schema)


TABLE = Shape("r", {"id": "integer", "name": "text", "n": "bigint"}, frozenset({"name"}),
              frozenset({"CHECK ((n >= 0))"}), frozenset({"(id)"}))


@pytest.mark.parametrize(("have", "problems"), [
    (TABLE, []),
    (Shape("r", {**TABLE.columns, "note": "text"}, TABLE.required, TABLE.constraints, TABLE.unique_keys), []),
    (Shape("p", TABLE.columns, TABLE.required, TABLE.constraints, TABLE.unique_keys), []),
    (Shape("r", {"id": "integer", "n": "bigint"}, frozenset(), TABLE.constraints, TABLE.unique_keys),
     ["missing columns name"]),
    (Shape("r", {**TABLE.columns, "n": "integer"}, TABLE.required, TABLE.constraints, TABLE.unique_keys),
     ["other types: n integer (bq-refresh's: bigint)"]),
    (Shape("r", {**TABLE.columns, "who": "text"}, frozenset({"name", "who"}), TABLE.constraints, TABLE.unique_keys),
     ["NOT NULL without a default, which bq-refresh does not fill: who"]),
    (Shape("r", TABLE.columns, TABLE.required, frozenset({"CHECK ((n > 10))"}), TABLE.unique_keys),
     ["constraint CHECK ((n > 10)) is not bq-refresh's", "lacks CHECK ((n >= 0))"]),
    (Shape("r", TABLE.columns, TABLE.required, TABLE.constraints, frozenset()), ["no unique index on (id)"]),
    (Shape("v", TABLE.columns), ["it is a view, bq-refresh's is a table"]),
], ids=["same", "extra column", "partitioned", "missing", "type", "not null extra", "check", "unique", "view"])
def test_shape_differences(have: Shape, problems: list[str]) -> None:
    assert shape_differences(have, TABLE, TABLE) == problems


def test_a_column_a_later_migration_adds_is_not_required() -> None:
    created = Shape("r", {"id": "integer"})
    final = Shape("r", {"id": "integer", "watermark": "text"})
    assert shape_differences(Shape("r", {"id": "integer"}), created, final) == []
    assert shape_differences(Shape("r", {"id": "integer", "watermark": "jsonb"}), created, final) == [
        "other types: watermark jsonb (bq-refresh's: text)"]
