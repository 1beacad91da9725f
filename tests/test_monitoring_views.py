"""The deployment guide's monitoring views (refresh_success_rate, data_quality_overview) on real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.rows import dict_row

from tasks.migrations import apply_migrations, load_migrations, render

NOW = datetime.now(UTC)


def audit(pg: psycopg.Connection[Any], s: str, table: str, status: str, started_ago: timedelta,
          ms: int | None = 1000) -> int:
    started = NOW - started_ago
    completed = None if status == "running" else started + timedelta(milliseconds=ms or 0)
    row = pg.execute(f'INSERT INTO "{s}".refresh_audit_log (table_schema, table_name, refresh_started_at,'
                     " refresh_completed_at, status, execution_time_ms) VALUES ('sqp', %s, %s, %s, %s, %s) RETURNING id",
                     (table, started, completed, status, None if status == "running" else ms)).fetchone()
    assert row is not None
    return int(row[0])


def check(pg: psycopg.Connection[Any], s: str, audit_id: int, metric: str, ok: bool | None) -> None:
    pg.execute(f'INSERT INTO "{s}".refresh_data_quality (audit_log_id, metric_name, is_within_threshold)'
               " VALUES (%s, %s, %s)", (audit_id, metric, ok))


def view(pg: psycopg.Connection[Any], query: str) -> list[dict[str, Any]]:
    with pg.cursor(row_factory=dict_row) as cur:
        return list(cur.execute(query).fetchall())


def test_success_rate_counts_success_warning_and_failure_apart_over_seven_days(
    pg: psycopg.Connection[Any], schema: str
) -> None:
    s = schema
    apply_migrations(pg, s)
    h = timedelta(hours=1)
    d = timedelta(days=1)
    # asin: 3 success, 2 warning (the latest run is a warning), 1 failed, 1 skipped, 1 running within 7 days
    a = [audit(pg, s, "asin", "success", 5 * d, 1000), audit(pg, s, "asin", "success", 3 * d, 2000),
         audit(pg, s, "asin", "success", 2 * d, 3000), audit(pg, s, "asin", "warning", 1 * d, 4000),
         audit(pg, s, "asin", "warning", h, 5000), audit(pg, s, "asin", "failed", 4 * d, 6000),
         audit(pg, s, "asin", "skipped", 6 * d, 0), audit(pg, s, "asin", "running", 10 * timedelta(minutes=1))]
    # outside the 7 days: not counted
    audit(pg, s, "asin", "failed", 8 * d)
    audit(pg, s, "asin", "success", 30 * d)
    audit(pg, s, "gone", "success", 10 * d)
    audit(pg, s, "warned", "warning", 2 * d)
    audit(pg, s, "warned", "warning", 1 * d)
    audit(pg, s, "starting", "running", h)

    rows = {r["table_name"]: r for r in view(pg, f'SELECT * FROM "{s}".refresh_success_rate')}
    assert set(rows) == {"asin", "warned", "starting"}
    asin = rows["asin"]
    completed = dict(pg.execute(f'SELECT id, refresh_completed_at FROM "{s}".refresh_audit_log').fetchall())
    assert asin == {
        "table_schema": "sqp", "table_name": "asin",
        "success_rate": Decimal("50.00"), "warning_rate": Decimal("33.33"), "failure_rate": Decimal("16.67"),
        "avg_execution_time_ms": Decimal("3500.0"),  # the six finished runs: (1+2+3+4+5+6)/6 s
        "last_successful_refresh": completed[a[2]],  # not the later warning run
        "last_warning_refresh": completed[a[4]],
        "last_failed_refresh": completed[a[5]],  # not the 8-day-old failure
        "total_runs": 6, "success_count": 3, "warning_count": 2, "failed_count": 1, "skipped_count": 1,
        "running_count": 1,
    }
    assert rows["warned"]["success_rate"] == Decimal("0.00") and rows["warned"]["last_successful_refresh"] is None
    assert rows["warned"]["warning_rate"] == Decimal("100.00")
    assert rows["starting"]["success_rate"] is None and rows["starting"]["running_count"] == 1

    # The guide's own query (Step 7) runs as written against the view.
    guide = view(pg, f'SELECT table_name, success_rate, avg_execution_time_ms, last_successful_refresh'
                     f' FROM "{s}".refresh_success_rate ORDER BY table_name')
    assert [r["table_name"] for r in guide] == ["asin", "starting", "warned"]


def test_data_quality_overview_has_the_guides_pass_rate_and_total_checks(pg: psycopg.Connection[Any], schema: str) -> None:
    s = schema
    apply_migrations(pg, s)
    d = timedelta(days=1)
    recent_a, recent_b = audit(pg, s, "asin", "success", 1 * d), audit(pg, s, "daily", "failed", 2 * d)
    old = audit(pg, s, "asin", "failed", 9 * d)
    for ok in (True, True, False):
        check(pg, s, recent_a, "row_count", ok)
    check(pg, s, recent_b, "row_count", True)
    check(pg, s, recent_a, "checksum", True)
    check(pg, s, recent_b, "checksum", None)  # outcome unknown: a check, not a pass
    for _ in range(5):
        check(pg, s, old, "row_count", False)  # outside the 7 days
    check(pg, s, old, "only_old", False)

    overview = {r["metric_name"]: r for r in view(pg, f'SELECT * FROM "{s}".data_quality_overview')}
    assert set(overview) == {"row_count", "checksum"}
    assert {k: overview["row_count"][k] for k in ("pass_rate", "total_checks", "passed_checks", "failed_checks",
                                                  "tables_checked")} == {
        "pass_rate": Decimal("75.00"), "total_checks": 4, "passed_checks": 3, "failed_checks": 1, "tables_checked": 2}
    assert {k: overview["checksum"][k] for k in ("pass_rate", "total_checks", "passed_checks", "failed_checks")} == {
        "pass_rate": Decimal("50.00"), "total_checks": 2, "passed_checks": 1, "failed_checks": 0}

    by_table = {(r["table_name"], r["metric_name"]): (r["pass_rate"], r["total_checks"])
                for r in view(pg, f'SELECT * FROM "{s}".data_quality_by_table')}
    assert by_table == {("asin", "row_count"): (Decimal("66.67"), 3), ("daily", "row_count"): (Decimal("100.00"), 1),
                        ("asin", "checksum"): (Decimal("100.00"), 1), ("daily", "checksum"): (Decimal("0.00"), 1)}
    guide = view(pg, f'SELECT metric_name, pass_rate, total_checks FROM "{s}".data_quality_overview ORDER BY 1')
    assert [(r["metric_name"], r["total_checks"]) for r in guide] == [("checksum", 2), ("row_count", 4)]


def test_the_monitoring_migration_runs_again_without_change(pg: psycopg.Connection[Any], schema: str) -> None:
    apply_migrations(pg, schema)
    migration = next(m for m in load_migrations() if m.name == "005_monitoring_and_archive.sql")
    pg.execute(f'INSERT INTO "{schema}".refresh_audit_log_archive (id, table_schema, table_name, refresh_started_at)'
               " VALUES (1, 'sqp', 't', now())")
    pg.execute(render(migration.text, schema).encode())  # idempotent: the archive keeps its rows
    assert pg.execute(f'SELECT count(*) FROM "{schema}".refresh_audit_log_archive').fetchone() == (1,)
    assert pg.execute(f'SELECT count(*) FROM "{schema}".refresh_success_rate').fetchone() == (0,)
