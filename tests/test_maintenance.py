"""Maintenance: checkpoint expiry, log retention, the audit archive, orphaned staging, discovery of new tables."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from blocks import BigQuerySource
from bq_refresh.errors import TargetError
from bq_refresh.settings import Settings
from flows.maintenance import maintenance_flow
from tasks.maintenance import AUDIT_ARCHIVES, archive_audit, audit_referencing_tables
from tasks.migrations import apply_migrations
from tasks.registry import register_table
from tests.bqdata import put_table
from tests.test_engine import SQP_KEY, SQP_SCHEMA, sqp_rows

pytestmark = [pytest.mark.emulator, pytest.mark.usefixtures("prefect_harness")]

NOTHING = {"checkpoints_expired": 0, "checkpoints_deleted": 0, "alerts_deleted": 0, "view_refreshes_deleted": 0,
           "audit_rows_archived": 0, "quality_rows_archived": 0, "quarantine_rows_archived": 0,
           "staging_tables_dropped": [], "rowhash_tables_dropped": [], "tables_discovered": [], "verified": {},
           "repaired": []}


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

    report = maintenance_flow(verify=False)  # verify: tests/test_verify.py
    assert report == {**NOTHING, "checkpoints_expired": 1, "audit_rows_archived": 1,
                      "staging_tables_dropped": ["orphan__12345678"], "rowhash_tables_dropped": [],
                      "tables_discovered": ["brand_new"]}
    assert pg.execute(f'SELECT table_name FROM "{schema}".refresh_audit_log').fetchall() == [("new",)]
    assert pg.execute(f'SELECT table_name FROM "{schema}".refresh_audit_log_archive').fetchall() == [("old",)]
    row = pg.execute(f'SELECT is_enabled, custom_sync_params->>\'source\' FROM "{schema}".refresh_config'
                     " WHERE table_name = 'brand_new'").fetchone()
    assert row == (False, f"{env.bigquery_dataset}.brand_new")
    assert maintenance_flow(verify=False) == NOTHING


# --- housekeeping on a database full of old rows --------------------------------------------------------------

NOW = datetime.now(UTC)
HALF_DAY = timedelta(hours=12)  # every generated age is N days + 12 h: no row sits on a retention boundary


def ago(days: int) -> datetime:
    return NOW - timedelta(days=days) - HALF_DAY


AUDIT_STATUSES = ("success", "warning", "failed", "skipped", "running")
VIEW_STATUSES = ("success", "failed", "skipped", "running")


def generate() -> dict[str, list[dict[str, Any]]]:
    """Rows of every kind maintenance touches, old and new; ids explicit so the expectations can name them."""
    audit = [{"id": i + 1, "table_schema": "sqp", "table_name": f"t{i % 9}", "status": AUDIT_STATUSES[i % 5],
              "refresh_started_at": ago((i * 7) % 180), "days": (i * 7) % 180} for i in range(600)]
    quality = [{"id": 2 * a["id"] - k, "audit_log_id": a["id"], "metric_name": ("row_count", "checksum")[k],
                "is_within_threshold": (a["id"] + k) % 3 != 0} for a in audit for k in (0, 1)]
    quality += [{"id": 2000 + i, "audit_log_id": None, "metric_name": "orphan", "is_within_threshold": True}
                for i in range(50)]
    quarantine = [{"id": a["id"], "audit_log_id": a["id"], "reason": "NULL key"} for a in audit if a["id"] % 3 == 0]
    checkpoints = [{"id": i + 1, "status": ("active", "completed", "expired")[i % 3], "days": (i * 11) % 60,
                    "expires_at": NOW + (timedelta(days=1) if i % 2 else -timedelta(hours=1))} for i in range(450)]
    alerts = [{"id": i + 1, "days": (i * 13) % 60, "status": ("delivered", "undelivered")[i % 2]} for i in range(500)]
    views = [{"id": i + 1, "view_name": f"v{i % 10}", "days": (i * 7) % 60, "status": VIEW_STATUSES[i % 4]}
             for i in range(300)]
    return {"audit": audit, "quality": quality, "quarantine": quarantine, "checkpoints": checkpoints,
            "alerts": alerts, "views": views}


def fill(pg: psycopg.Connection[Any], s: str, rows: dict[str, list[dict[str, Any]]]) -> None:
    with pg.cursor() as cur:
        with cur.copy(f'COPY "{s}".refresh_audit_log (id, table_schema, table_name, refresh_started_at,'
                      " refresh_completed_at, status, rows_processed, execution_time_ms, sync_metadata) FROM STDIN") as cp:
            for a in rows["audit"]:
                done = None if a["status"] == "running" else a["refresh_started_at"] + timedelta(seconds=30)
                cp.write_row((a["id"], a["table_schema"], a["table_name"], a["refresh_started_at"], done, a["status"],
                              a["id"] * 10, 30000, Jsonb({"n": a["id"]})))
        with cur.copy(f'COPY "{s}".refresh_data_quality (id, audit_log_id, metric_name, metric_value,'
                      " is_within_threshold) FROM STDIN") as cp:
            for q in rows["quality"]:
                cp.write_row((q["id"], q["audit_log_id"], q["metric_name"], q["id"], q["is_within_threshold"]))
        with cur.copy(f'COPY "{s}".refresh_quarantine (id, audit_log_id, table_schema, table_name, reason, row_data)'
                      " FROM STDIN") as cp:
            for z in rows["quarantine"]:
                cp.write_row((z["id"], z["audit_log_id"], "sqp", "t", z["reason"], Jsonb({"id": None, "n": z["id"]})))
        with cur.copy(f'COPY "{s}".refresh_checkpoints (id, function_name, table_schema, table_name, checkpoint_data,'
                      " status, created_at, updated_at, expires_at) FROM STDIN") as cp:
            for c in rows["checkpoints"]:
                cp.write_row((c["id"], "refresh_table", "sqp", f"t{c['id']}", Jsonb({"plan": {}}), c["status"],
                              ago(c["days"] + 1), ago(c["days"]), c["expires_at"]))
        with cur.copy(f'COPY "{s}".refresh_alerts (id, event, table_name, channel, status, attempts, payload,'
                      " created_at) FROM STDIN") as cp:
            for al in rows["alerts"]:
                cp.write_row((al["id"], "table_failed", "t", "127.0.0.1:9", al["status"], 1, Jsonb({"n": al["id"]}),
                              ago(al["days"])))
        with cur.copy(f'COPY "{s}".materialized_view_refresh_status (id, view_schema, view_name, refresh_started_at,'
                      " status) FROM STDIN") as cp:
            for v in rows["views"]:
                cp.write_row((v["id"], "sqp", v["view_name"], ago(v["days"]), v["status"]))
    for table in ("refresh_audit_log", "refresh_data_quality", "refresh_quarantine", "refresh_checkpoints",
                  "refresh_alerts", "materialized_view_refresh_status"):
        pg.execute(f"SELECT setval(pg_get_serial_sequence('\"{s}\".{table}', 'id'), (SELECT max(id) FROM \"{s}\".{table}))")


def contents(pg: psycopg.Connection[Any], s: str, table: str, drop: tuple[str, ...] = ()) -> dict[int, Any]:
    """Every row of a table as JSON by id (``drop``: columns left out, e.g. the archive's archived_at)."""
    minus = "".join(f" - '{c}'" for c in drop)
    return {int(r[0]): r[1] for r in pg.execute(f'SELECT id, to_jsonb(t){minus} FROM "{s}".{table} t').fetchall()}


def test_housekeeping_on_a_database_full_of_old_rows(env: Settings, pg: psycopg.Connection[Any]) -> None:
    s = env.schema_name
    apply_migrations(pg, s)
    rows = generate()
    fill(pg, s, rows)
    live = ("refresh_audit_log", "refresh_data_quality", "refresh_quarantine", "refresh_checkpoints",
            "refresh_alerts", "materialized_view_refresh_status")
    before = {t: contents(pg, s, t) for t in live}
    assert {t: len(v) for t, v in before.items()} == {
        "refresh_audit_log": 600, "refresh_data_quality": 1250, "refresh_quarantine": 200,
        "refresh_checkpoints": 450, "refresh_alerts": 500, "materialized_view_refresh_status": 300}

    # What must go, from the generated data (not from the SQL under test).
    archived = {a["id"] for a in rows["audit"] if a["days"] >= 90 and a["status"] != "running"}
    assert archived and any(a["days"] >= 90 and a["status"] == "running" for a in rows["audit"])  # old running kept
    quality_archived = {q["id"] for q in rows["quality"] if q["audit_log_id"] in archived}
    quarantine_archived = {z["id"] for z in rows["quarantine"] if z["audit_log_id"] in archived}
    newly_expired = {c["id"] for c in rows["checkpoints"] if c["status"] == "active" and c["expires_at"] < NOW}
    checkpoints_deleted = {c["id"] for c in rows["checkpoints"] if c["status"] != "active" and c["days"] >= 30}
    assert any(c["status"] == "active" and c["days"] >= 30 for c in rows["checkpoints"])  # old active ones kept
    alerts_deleted = {a["id"] for a in rows["alerts"] if a["days"] >= 30}
    latest_per_view = {v["view_name"]: v["id"] for v in rows["views"]}  # ids ascend: the last one wins
    views_deleted = {v["id"] for v in rows["views"]
                     if v["days"] >= 30 and v["status"] != "running" and v["id"] != latest_per_view[v["view_name"]]}
    assert any(rows["views"][i - 1]["days"] >= 30 for i in latest_per_view.values())  # an old latest row is kept

    report = maintenance_flow(discover=False, verify=False)
    assert report == {**NOTHING, "checkpoints_expired": len(newly_expired), "checkpoints_deleted": len(checkpoints_deleted),
                      "alerts_deleted": len(alerts_deleted), "view_refreshes_deleted": len(views_deleted),
                      "audit_rows_archived": len(archived), "quality_rows_archived": len(quality_archived),
                      "quarantine_rows_archived": len(quarantine_archived)}

    after = {t: contents(pg, s, t) for t in live}
    gone = {"refresh_audit_log": archived, "refresh_data_quality": quality_archived,
            "refresh_quarantine": quarantine_archived, "refresh_checkpoints": checkpoints_deleted,
            "refresh_alerts": alerts_deleted, "materialized_view_refresh_status": views_deleted}
    for table in live:
        expected = {i: row for i, row in before[table].items() if i not in gone[table]}
        if table == "refresh_checkpoints":  # expired now: status and updated_at changed, nothing else
            for i in newly_expired:
                assert after[table][i]["status"] == "expired" and after[table][i]["updated_at"] != expected[i]["updated_at"]
                expected[i] = {**expected[i], "status": "expired", "updated_at": after[table][i]["updated_at"]}
        assert after[table] == expected, table

    # The archive holds exactly the moved rows, unchanged, ids kept, each quality/quarantine row with its audit row.
    for table, ids in (("refresh_audit_log", archived), ("refresh_data_quality", quality_archived),
                       ("refresh_quarantine", quarantine_archived)):
        assert contents(pg, s, AUDIT_ARCHIVES[table], drop=("archived_at",)) == {i: before[table][i] for i in ids}, table
    orphans = pg.execute(f'SELECT count(*) FROM "{s}".refresh_data_quality_archive q'
                         f' LEFT JOIN "{s}".refresh_audit_log_archive a ON a.id = q.audit_log_id WHERE a.id IS NULL')
    assert orphans.fetchone() == (0,)

    # A second run finds nothing more to do, and the audit log's serial goes on past the archived ids.
    assert maintenance_flow(discover=False, verify=False) == NOTHING
    new_id = pg.execute(f"INSERT INTO \"{s}\".refresh_audit_log (table_schema, table_name, refresh_started_at, status)"
                        " VALUES ('sqp', 'x', now(), 'running') RETURNING id").fetchone()
    assert new_id is not None and new_id[0] > 600


def test_archiving_refuses_when_an_unknown_table_references_the_audit_log(
    pg: psycopg.Connection[Any], schema: str
) -> None:
    apply_migrations(pg, schema)
    assert audit_referencing_tables(pg, schema) == {"refresh_data_quality", "refresh_quarantine"}
    pg.execute(f'INSERT INTO "{schema}".refresh_audit_log (table_schema, table_name, refresh_started_at, status)'
               " VALUES ('sqp', 'old', now() - interval '200 days', 'success')")
    pg.execute(f'CREATE TABLE "{schema}".refresh_notes (id serial, audit_log_id int'
               f' REFERENCES "{schema}".refresh_audit_log (id) ON DELETE CASCADE)')
    pg.execute(f'INSERT INTO "{schema}".refresh_notes (audit_log_id) SELECT id FROM "{schema}".refresh_audit_log')
    with pytest.raises(TargetError, match="refresh_notes"):
        archive_audit(pg, schema, 90)
    assert pg.execute(f'SELECT count(*) FROM "{schema}".refresh_notes').fetchone() == (1,)
    assert pg.execute(f'SELECT count(*) FROM "{schema}".refresh_audit_log_archive').fetchone() == (0,)


def test_a_column_added_to_the_audit_log_reaches_the_archive(pg: psycopg.Connection[Any], schema: str) -> None:
    apply_migrations(pg, schema)
    pg.execute(f'ALTER TABLE "{schema}".refresh_audit_log ADD COLUMN data_as_of timestamptz')
    pg.execute(f'INSERT INTO "{schema}".refresh_audit_log (table_schema, table_name, refresh_started_at, status,'
               " data_as_of) VALUES ('sqp', 'old', now() - interval '200 days', 'success', '2020-01-01Z')")
    assert archive_audit(pg, schema, 90).audit == 1
    moved = pg.execute(f'SELECT data_as_of FROM "{schema}".refresh_audit_log_archive').fetchone()
    assert moved == (datetime(2020, 1, 1, tzinfo=UTC),)
