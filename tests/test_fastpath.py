"""The fast paths, end to end on the emulator: the direct initial load (straight into the empty target,
indexes built after, all-or-nothing) and the row-hash reload (unchanged rows never reach PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pyarrow as pa
import pytest

from blocks import BigQuerySource
from bq_refresh.errors import QualityCheckFailed
from bq_refresh.settings import Settings
from flows.refresh_table import refresh_table
from tasks.load import rowhash_table
from tasks.migrations import apply_migrations
from tasks.registry import register_table
from tests.bqdata import assert_same_rows, create_sqp_target, pg_rows, put_table, source_rows
from tests.test_engine import SQP_KEY, SQP_SCHEMA, T0, sqp_rows

pytestmark = [pytest.mark.emulator, pytest.mark.usefixtures("prefect_harness")]
WINDOW = {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at", "lookback": "7d", "mode": "window",
          "window_column": "start_date"}


@pytest.fixture
def source(env: Settings, pg: psycopg.Connection[Any]) -> BigQuerySource:
    apply_migrations(pg, env.schema_name)
    return BigQuerySource.from_settings(env)


def live(pg: psycopg.Connection[Any], schema: str) -> list[dict[str, Any]]:
    return pg_rows(pg, f'"{schema}".sqp', "start_date, asin, search_query")


def test_an_empty_target_is_loaded_directly_and_keeps_views_grants_policies_and_indexes(
    env: Settings, pg: psycopg.Connection[Any], source: BigQuerySource,
) -> None:
    s = env.schema_name
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(3000))
    create_sqp_target(pg, s)
    pg.execute(f'CREATE VIEW "{s}".sqp_v AS SELECT asin, impressions FROM "{s}".sqp')
    pg.execute(f'ALTER TABLE "{s}".sqp ENABLE ROW LEVEL SECURITY')
    pg.execute(f'CREATE POLICY only_b0 ON "{s}".sqp USING (asin LIKE $$B0%$$)')
    pg.execute(f'GRANT SELECT ON "{s}".sqp TO PUBLIC')
    before = pg.execute("SELECT oid FROM pg_class WHERE oid = %s::regclass", (f'"{s}".sqp',)).fetchone()
    # Every policy the table has (a server may add its own to a new table, as the Supabase-like one does).
    policies_sql = "SELECT policyname, qual FROM pg_policies WHERE schemaname = %s AND tablename = 'sqp' ORDER BY 1"
    policies = pg.execute(policies_sql, (s,)).fetchall()
    assert ("only_b0", "(asin ~~ 'B0%'::text)") in policies
    register_table(pg, s, "sqp", WINDOW)

    first = refresh_table("sqp")
    assert first["direct_load"] is True and first["rows_inserted"] == 3000
    assert sorted(first["indexes_rebuilt"]) == ["sqp_by_asin", "sqp_pkey"]
    assert_same_rows(source_rows(source, "sqp"), live(pg, s), SQP_KEY)
    # The same table (views bound to it still work), its indexes, policy and grant all there.
    assert pg.execute("SELECT oid FROM pg_class WHERE oid = %s::regclass", (f'"{s}".sqp',)).fetchone() == before
    assert pg.execute(f'SELECT count(*) FROM "{s}".sqp_v').fetchone() == (3000,)
    indexes = {r[0] for r in pg.execute("SELECT indexname FROM pg_indexes WHERE schemaname = %s AND tablename = 'sqp'", (s,))}
    assert indexes == {"sqp_pkey", "sqp_by_asin"}
    assert pg.execute(policies_sql, (s,)).fetchall() == policies
    assert pg.execute("SELECT has_table_privilege('public', %s, 'SELECT')", (f'"{s}".sqp',)).fetchone() == (True,)
    # Every row's hash kept beside the live table (in the staging schema), none in it.
    side = f'"{s}_staging"."{rowhash_table(s, "sqp")}"'
    assert pg.execute(f'SELECT count(*), count(DISTINCT h) FROM {side}').fetchone() == (3000, 3000)
    assert pg.execute(f'SELECT count(*) FROM {side} r JOIN "{s}".sqp t USING (start_date, asin, search_query)'
                      ).fetchone() == (3000,)
    checks = {r[0]: r[1] for r in pg.execute(f'SELECT metric_name, is_within_threshold FROM "{s}".refresh_data_quality')}
    assert checks["row_count"] and checks["checksum"]
    assert pg.execute(f'SELECT status FROM "{s}".refresh_checkpoints').fetchall() == [("completed",)]
    wm = pg.execute(f'SELECT watermark FROM "{s}".refresh_config').fetchone()
    assert wm is not None and wm[0].startswith("2025-01-05 12:00:00.002999")

    again = refresh_table("sqp")  # nothing changed: every row skipped by its hash
    assert again["direct_load"] is False and again["rows_skipped_unchanged"] == 3000
    assert again["rows_inserted"] == again["rows_updated"] == again["rows_deleted"] == 0


def test_a_reload_sends_only_changed_rows_and_still_replaces_restated_windows_exactly(
    env: Settings, pg: psycopg.Connection[Any], source: BigQuerySource,
) -> None:
    s = env.schema_name
    rows = sqp_rows(2000, weeks=4)
    put_table(source, "sqp", SQP_SCHEMA, rows)
    register_table(pg, s, "sqp", WINDOW)
    assert refresh_table("sqp")["direct_load"] is True

    # Restate: 10% of the rows change (value and cursor), one row vanishes from a week whose other rows are all
    # unchanged, one new row; everything re-sent.
    data = rows.to_pylist()
    for i, r in enumerate(data):
        if i % 10 == 0:
            r["median_price"] += Decimal(1)
            r["updated_at"] += timedelta(days=1)
    gone = next(r for i, r in enumerate(data) if i % 10 != 0 and r["start_date"] == data[1]["start_date"])
    data.remove(gone)
    data.append({**data[0], "search_query": "brand new query", "updated_at": T0 + timedelta(days=2)})
    put_table(source, "sqp", SQP_SCHEMA, pa.Table.from_pylist(data, schema=rows.schema))

    second = refresh_table("sqp")
    assert second["rows_skipped_unchanged"] == 2000 - 200 - 1
    assert second["rows_updated"] == 200 and second["rows_inserted"] == 1 and second["rows_deleted"] == 1
    assert_same_rows(source_rows(source, "sqp"), live(pg, s), SQP_KEY)
    staged = pg.execute(f'SELECT sync_metadata->>\'rows_skipped_unchanged\' FROM "{s}".refresh_audit_log ORDER BY id DESC LIMIT 1').fetchone()
    assert staged == ("1799",)

    # A full refresh re-sends everything (the way to repair a target edited by hand).
    pg.execute(f'UPDATE "{s}".sqp SET impressions = -1 WHERE asin = %s', (data[5]["asin"],))
    repaired = refresh_table("sqp", full_refresh=True)
    assert repaired["rows_skipped_unchanged"] == 0 and repaired["rows_updated"] > 0
    assert_same_rows(source_rows(source, "sqp"), live(pg, s), SQP_KEY)


def test_a_direct_load_that_meets_a_repeated_key_falls_back_to_staging(
    env: Settings, pg: psycopg.Connection[Any], source: BigQuerySource,
) -> None:
    s = env.schema_name
    rows = sqp_rows(300)
    dupe = rows.slice(5, 1).to_pylist()[0]
    dupe["impressions"], dupe["updated_at"] = -5, T0 + timedelta(days=3)
    put_table(source, "sqp", SQP_SCHEMA, pa.concat_tables([rows, pa.Table.from_pylist([dupe], schema=rows.schema)]))
    register_table(pg, s, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})
    result = refresh_table("sqp")
    assert result["direct_load"] is False and result["duplicate_keys"] == 1 and result["rows_inserted"] == 300
    got = pg.execute(f'SELECT impressions FROM "{s}".sqp WHERE asin = %s AND search_query = %s AND start_date = %s',
                     (dupe["asin"], dupe["search_query"], dupe["start_date"])).fetchone()
    assert got == (-5,)  # the latest cursor won


def test_a_direct_load_failing_its_checks_leaves_the_target_empty_with_its_indexes(
    env: Settings, pg: psycopg.Connection[Any], source: BigQuerySource,
) -> None:
    s = env.schema_name
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(500))
    create_sqp_target(pg, s)
    register_table(pg, s, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at",
                                  "checks": {"ranges": {"impressions": [0, 1200]}, "hard": ["range"]}})
    with pytest.raises(QualityCheckFailed, match="range:impressions"):
        refresh_table("sqp")
    assert pg.execute(f'SELECT count(*) FROM "{s}".sqp').fetchone() == (0,)
    indexes = {r[0] for r in pg.execute("SELECT indexname FROM pg_indexes WHERE schemaname = %s AND tablename = 'sqp'", (s,))}
    assert indexes == {"sqp_pkey", "sqp_by_asin"}
    assert pg.execute(f'SELECT watermark FROM "{s}".refresh_config').fetchone() == (None,)


@pytest.mark.once
def test_a_timeout_during_a_direct_load_fails_the_table_and_leaves_it_empty(
    env: Settings, pg: psycopg.Connection[Any], source: BigQuerySource, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The flow's timeout interrupts the COPY's batch supplier: the cancellation is not mistaken for a
    transient COPY error (and retried into a success after the deadline)."""
    import tests.killable_refresh  # noqa: F401  (registers the slow transform)
    from flows.daily_refresh import daily_refresh, night_summary

    s = env.schema_name
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(8000))
    register_table(pg, s, "t", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at", "batch_size": 200,
                                "transform": "slow_for_tests"})
    monkeypatch.setenv("REFRESH_TABLE_TIMEOUT_SECONDS", "2")  # 40 batches x 0.15 s take ~6 s
    state = daily_refresh(tables=["t"], return_state=True)
    summary = night_summary(state)
    assert summary["failed"] == [f"{s}.t"], summary
    assert pg.execute(f'SELECT count(*) FROM "{s}".t').fetchone() == (0,)
    monkeypatch.setenv("REFRESH_TABLE_TIMEOUT_SECONDS", "120")
    assert refresh_table("t")["rows_inserted"] == 8000
