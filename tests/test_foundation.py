"""Foundation: migrations against a real PostgreSQL, and the emulator's Storage Read API into Arrow."""

from __future__ import annotations

import io
import uuid
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
from google.cloud import bigquery
from google.cloud.bigquery_storage_v1 import types

from blocks import BigQuerySource
from bq_refresh.services import EmulatorEndpoints
from tasks.migrations import apply_migrations, event_trigger_name, load_migrations
from tests.conftest import EMULATOR_PROJECT

EXPECTED_TABLES = {
    "refresh_config", "refresh_audit_log", "refresh_dependencies", "refresh_data_quality",
    "refresh_checkpoints", "materialized_view_refresh_status", "refresh_quarantine", "schema_migrations",
    "refresh_alerts", "refresh_audit_log_archive", "refresh_data_quality_archive", "refresh_quarantine_archive",
}


def catalog(conn: psycopg.Connection[Any], schema: str) -> dict[str, set[str]]:
    def names(query: str) -> set[str]:
        return {r[0] for r in conn.execute(query, (schema,)).fetchall()}

    return {
        "tables": names("SELECT tablename FROM pg_tables WHERE schemaname = %s"),
        "views": names("SELECT viewname FROM pg_views WHERE schemaname = %s"),
        "indexes": names("SELECT indexname FROM pg_indexes WHERE schemaname = %s"),
        "functions": names(
            "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = %s"
        ),
        "triggers": names(
            "SELECT t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND NOT t.tgisinternal"
        ),
    }


def test_migrations_apply_twice_and_build_the_catalog(pg: psycopg.Connection[Any], schema: str) -> None:
    first = apply_migrations(pg, schema)
    before = catalog(pg, schema)
    second = apply_migrations(pg, schema)
    after = catalog(pg, schema)

    assert first.applied == [m.name for m in load_migrations()]
    assert first.applied[:5] == ["001_refresh_system.sql", "002_sync_state.sql", "003_alerts.sql",
                                 "004_watermark_target.sql", "005_monitoring_and_archive.sql"]
    assert second.applied == [] and second.already_applied == first.applied
    assert before == after
    assert EXPECTED_TABLES <= after["tables"]
    assert {"refresh_success_rate", "data_quality_overview", "data_quality_by_table"} <= after["views"]
    assert {"uq_checkpoints_one_active", "idx_refresh_config_next_refresh", "idx_audit_log_table"} <= after["indexes"]
    assert {"expire_checkpoints", "update_refresh_config_timestamp"} <= after["functions"]
    assert "purge_audit_log" not in after["functions"]  # audit rows are archived (maintenance), never deleted
    assert "update_refresh_config_timestamp" in after["triggers"]
    recorded = pg.execute(f'SELECT count(*) FROM "{schema}".schema_migrations').fetchone()
    assert recorded == (len(first.applied),)


def test_constraints_and_triggers_behave(pg: psycopg.Connection[Any], schema: str) -> None:
    apply_migrations(pg, schema)
    s = f'"{schema}"'
    pg.execute(f"INSERT INTO {s}.refresh_config (table_schema, table_name) VALUES ('sqp', 'a')")
    row = pg.execute(f"SELECT id, updated_at FROM {s}.refresh_config").fetchone()
    assert row is not None
    pg.execute(f"UPDATE {s}.refresh_config SET priority = 5 WHERE id = %s", (row[0],))
    updated = pg.execute(f"SELECT updated_at FROM {s}.refresh_config").fetchone()
    assert updated is not None and updated[0] >= row[1]

    # One active checkpoint per (function, table): the partial unique index.
    insert = (
        f"INSERT INTO {s}.refresh_checkpoints (function_name, table_schema, table_name, checkpoint_data, status)"
        " VALUES ('f', 'sqp', 'a', '{}', %s)"
    )
    pg.execute(insert, ("active",))
    pg.execute(insert, ("completed",))
    try:
        pg.execute(insert, ("active",))
        raise AssertionError("a second active checkpoint was accepted")
    except psycopg.errors.UniqueViolation:
        pass
    pg.execute(f"UPDATE {s}.refresh_checkpoints SET expires_at = now() - interval '1 minute'")
    expired = pg.execute(f"SELECT {s}.expire_checkpoints()").fetchone()
    assert expired == (1,)

    try:
        pg.execute(f"INSERT INTO {s}.refresh_audit_log (table_schema, table_name, refresh_started_at, status)"
                   " VALUES ('sqp', 'a', now(), 'bogus')")
        raise AssertionError("a bad status was accepted")
    except psycopg.errors.CheckViolation:
        pass
    pg.execute(f"INSERT INTO {s}.refresh_audit_log (table_schema, table_name, refresh_started_at, status)"
               " VALUES ('sqp', 'a', now() - interval '100 days', 'success'),"
               " ('sqp', 'a', now(), 'success')")
    rate = pg.execute(f"SELECT total_runs, success_rate FROM {s}.refresh_success_rate").fetchone()
    assert rate is not None and rate[0] == 1 and float(rate[1]) == 100.0  # the 100-day-old run is outside 7 days


def test_event_trigger_registers_new_tables_disabled(pg: psycopg.Connection[Any], schema: str) -> None:
    is_super = pg.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    report = apply_migrations(pg, schema)
    if not (is_super and is_super[0]):
        assert report.event_trigger.startswith("not created")
        return
    assert report.event_trigger == "created"
    pg.execute(f'CREATE TABLE "{schema}".new_table (id int)')
    pg.execute(f'CREATE TABLE "{schema}".refresh_internal (id int)')
    rows = pg.execute(f'SELECT table_name, is_enabled FROM "{schema}".refresh_config').fetchall()
    assert rows == [("new_table", False)]
    pg.execute(f'DROP SCHEMA "{schema}" CASCADE')
    gone = pg.execute("SELECT 1 FROM pg_event_trigger WHERE evtname = %s", (event_trigger_name(schema),))
    assert gone.fetchone() is None


def test_storage_read_api_returns_arrow(emulator: EmulatorEndpoints, dataset: str) -> None:
    source = BigQuerySource(
        project_id=EMULATOR_PROJECT, dataset=dataset, api_endpoint=emulator.rest_url,
        storage_endpoint=emulator.grpc_target,
    )
    client = source.get_bigquery_client()
    schema = [bigquery.SchemaField("id", "INT64"), bigquery.SchemaField("name", "STRING")]
    client.create_table(bigquery.Table(source.table_ref("t"), schema=schema), timeout=30)
    data = pa.table({"id": pa.array(range(100), pa.int64()), "name": [f"n{i}" for i in range(100)]})
    buf = io.BytesIO()
    pq.write_table(data, buf)
    buf.seek(0)
    client.load_table_from_file(
        buf, source.table_ref("t"), job_config=bigquery.LoadJobConfig(source_format="PARQUET")
    ).result(timeout=60)

    read = source.get_read_client()
    session = read.create_read_session(
        parent=f"projects/{EMULATOR_PROJECT}",
        read_session=types.ReadSession(
            table=f"projects/{EMULATOR_PROJECT}/datasets/{dataset}/tables/t",
            data_format=types.DataFormat.ARROW,
            read_options=types.ReadSession.TableReadOptions(selected_fields=["id", "name"], row_restriction="id >= 50"),
        ),
        max_stream_count=1,
    )
    arrow_schema = pa.ipc.read_schema(pa.py_buffer(session.arrow_schema.serialized_schema))
    batches = [
        pa.ipc.read_record_batch(pa.py_buffer(r.arrow_record_batch.serialized_record_batch), arrow_schema)
        for stream in session.streams
        for r in read.read_rows(stream.name)
    ]
    table = pa.Table.from_batches(batches, arrow_schema)
    assert table.num_rows == 50
    assert sorted(table.column("id").to_pylist()) == list(range(50, 100))


def test_without_superuser_rights_the_trigger_is_a_notice_not_a_failure(pg_uri: str, schema: str,
                                                                        pg: psycopg.Connection[Any]) -> None:
    role, password = f"{schema}_app", uuid.uuid4().hex  # a password: servers that check it (scram) log it in
    pg.execute(f'CREATE ROLE "{role}" LOGIN NOSUPERUSER PASSWORD \'{password}\'')
    pg.execute(f'GRANT "{role}" TO CURRENT_USER')  # so that a test role without superuser may drop its schema
    pg.execute(f'GRANT CREATE ON DATABASE {pg.info.dbname} TO "{role}"')
    try:
        with psycopg.connect(pg_uri, user=role, password=password, autocommit=True) as limited:
            report = apply_migrations(limited, schema)
        assert report.applied[0] == "001_refresh_system.sql"
        assert report.event_trigger.startswith("not created")
        assert pg.execute("SELECT 1 FROM pg_event_trigger WHERE evtname = %s", (event_trigger_name(schema),)).fetchone() is None
    finally:
        pg.execute(f'DROP SCHEMA IF EXISTS "{schema}", "{schema}_staging" CASCADE')  # init makes both
        pg.execute(f'REVOKE CREATE ON DATABASE {pg.info.dbname} FROM "{role}"')
        pg.execute(f'DROP ROLE "{role}"')
