"""Nothing lost: window mode replaces only periods read whole, the cursor read includes the watermark's own
value, floats keep the sign of zero, and a reconciliation inside the publish refuses any loss.

Every outcome is compared with the source value by value (tests/bqdata.py, no product code)."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pyarrow as pa
import pytest

from blocks import BigQuerySource
from bq_refresh.errors import QualityCheckFailed
from flows.refresh_table import refresh_table
from tasks.load import run_tables
from tasks.maintenance import drop_orphaned_staging
from tests.bqdata import assert_same_rows, bq_schema, pg_rows, put_table, source_rows
from tests.conftest import WebhookReceiver
from tests.test_engine import SQP_KEY, SQP_SCHEMA, T0, register, sqp_rows

pytestmark = [pytest.mark.emulator, pytest.mark.usefixtures("prefect_harness")]
WEEK = timedelta(weeks=1)


def live(pg: psycopg.Connection[Any], schema: str, table: str = "sqp") -> list[dict[str, Any]]:
    return pg_rows(pg, f'"{schema}"."{table}"', "1, 2, 3")


def row_versions(pg: psycopg.Connection[Any], schema: str) -> dict[tuple[Any, ...], str]:
    """Each row's xmin: a row rewritten by the publish gets a new one (exact, unlike the statistics views)."""
    rows = pg.execute(f'SELECT start_date, asin, search_query, xmin::text FROM "{schema}".sqp').fetchall()
    return {tuple(r[:3]): r[3] for r in rows}


def eight_weeks(n: int = 800) -> list[dict[str, Any]]:
    return sqp_rows(n, weeks=8).to_pylist()


def put(source: BigQuerySource, rows: list[dict[str, Any]]) -> None:
    put_table(source, "sqp", SQP_SCHEMA, pa.Table.from_pylist(rows, schema=sqp_rows(1).schema))


def window_table(pg: psycopg.Connection[Any], schema: str, **extra: Any) -> None:
    register(pg, schema, "sqp", source="sqp", key=SQP_KEY, cursor="updated_at", mode="window",
             window_column="start_date", **extra)


def test_a_partly_corrected_period_keeps_its_other_rows(source: BigQuerySource, registry: str,
                                                        pg: psycopg.Connection[Any]) -> None:
    """The reported loss: 10% of four weeks' rows get a new cursor; the rest of those weeks must stay."""
    rows = eight_weeks()
    put(source, rows)
    window_table(pg, registry)
    refresh_table("sqp")
    corrected = 0
    for i, r in enumerate(rows):
        if r["start_date"] < date(2025, 1, 5) + 4 * WEEK and i % 10 == 0:
            r["impressions"] += 1
            r["updated_at"] = T0 + timedelta(days=30)
            corrected += 1
    put(source, rows)
    result = refresh_table("sqp")
    assert result["status"] == "success", result
    assert (result["rows_inserted"], result["rows_updated"], result["rows_deleted"]) == (0, corrected, 0)
    assert_same_rows(source_rows(source, "sqp"), live(pg, registry), SQP_KEY)


def test_whole_period_redelivery_late_rows_and_silent_deletes(source: BigQuerySource, registry: str,
                                                              pg: psycopg.Connection[Any]) -> None:
    rows = eight_weeks()
    put(source, rows)
    window_table(pg, registry)
    refresh_table("sqp")
    week = [date(2025, 1, 5) + i * WEEK for i in range(8)]
    # week 3 redelivered whole (new cursor, one row gone); a late row into week 1 with an OLD cursor (below the
    # watermark: only the period counts can see it); a row of week 2 deleted without any cursor change.
    redelivered = [r for r in rows if r["start_date"] == week[2]]
    rows.remove(redelivered[0])
    for r in redelivered[1:]:
        r["updated_at"] = T0 + timedelta(days=40)
    rows.append({**rows[0], "search_query": "late arrival", "updated_at": T0 - timedelta(days=3)})
    rows.remove(next(r for r in rows if r["start_date"] == week[1]))
    put(source, rows)
    result = refresh_table("sqp")
    assert result["status"] == "success", result
    assert (result["rows_inserted"], result["rows_deleted"]) == (1, 2)
    assert_same_rows(source_rows(source, "sqp"), live(pg, registry), SQP_KEY)


def test_a_vanished_period_is_deleted_but_more_than_the_limit_needs_allow_deletes(
    source: BigQuerySource, registry: str, pg: psycopg.Connection[Any],
) -> None:
    rows = eight_weeks()
    put(source, rows)
    window_table(pg, registry)
    refresh_table("sqp")
    first, second = date(2025, 1, 5), date(2025, 1, 5) + WEEK
    put(source, [r for r in rows if r["start_date"] != first])
    assert refresh_table("sqp")["rows_deleted"] == 100  # one period vanished: within max_vanished_periods=1
    assert_same_rows(source_rows(source, "sqp"), live(pg, registry), SQP_KEY)

    put(source, rows)  # both back, then two gone at once
    refresh_table("sqp")
    put(source, [r for r in rows if r["start_date"] not in (first, second)])
    before = live(pg, registry)
    with pytest.raises(QualityCheckFailed, match="2 periods of start_date vanished.*--allow-deletes"):
        refresh_table("sqp")
    assert live(pg, registry) == before
    assert refresh_table("sqp", allow_deletes=True)["rows_deleted"] == 200
    assert_same_rows(source_rows(source, "sqp"), live(pg, registry), SQP_KEY)


@pytest.mark.parametrize("cursor_type", ["TIMESTAMP", "DATE"])
def test_a_later_delivery_with_the_watermarks_own_cursor_value_is_read(
    source: BigQuerySource, registry: str, pg: psycopg.Connection[Any], cursor_type: str,
) -> None:
    """dlt and Airbyte read the watermark's own value again; rows re-read unchanged are never rewritten."""
    fields = bq_schema([(n, t) for n, t in (("start_date", "DATE"), ("asin", "STRING"), ("search_query", "STRING"),
                                            ("impressions", "INT64"), ("loaded", cursor_type))])
    stamp: Any = date(2025, 2, 1) if cursor_type == "DATE" else T0

    def table(rows: list[dict[str, Any]]) -> pa.Table:
        kind = pa.date32() if cursor_type == "DATE" else pa.timestamp("us", tz="UTC")
        return pa.table({"start_date": pa.array([r["start_date"] for r in rows], pa.date32()),
                         "asin": [r["asin"] for r in rows], "search_query": [r["search_query"] for r in rows],
                         "impressions": pa.array([r["impressions"] for r in rows], pa.int64()),
                         "loaded": pa.array([r["loaded"] for r in rows], kind)})

    first = [{"start_date": date(2025, 1, 5), "asin": f"A{i}", "search_query": "q", "impressions": i, "loaded": stamp}
             for i in range(300)]
    put_table(source, "sqp", fields, table(first))
    register(pg, registry, "sqp", source="sqp", key=SQP_KEY, cursor="loaded")
    refresh_table("sqp")
    versions = row_versions(pg, registry)
    # A second load job of the same day: the same cursor value as the watermark, 60 new and 40 changed rows.
    second = [dict(r) for r in first]
    for r in second[:40]:
        r["impressions"] += 1000
    second += [{**first[0], "asin": f"N{i}", "impressions": -i} for i in range(60)]
    put_table(source, "sqp", fields, table(second))
    result = refresh_table("sqp")
    assert (result["rows_inserted"], result["rows_updated"]) == (60, 40), result
    after = row_versions(pg, registry)
    rewritten = [k for k, v in versions.items() if after[k] != v]
    assert len(rewritten) == 40  # the unchanged rows re-read at the watermark's value were skipped by hash
    assert_same_rows(source_rows(source, "sqp"), live(pg, registry), SQP_KEY)


def test_the_sign_of_zero_is_published(source: BigQuerySource, registry: str, pg: psycopg.Connection[Any]) -> None:
    fields = bq_schema([("id", "INT64"), ("f", "FLOAT64"), ("u", "INT64")])
    put_table(source, "z", fields, pa.table({"id": pa.array([1, 2], pa.int64()), "f": [0.0, -0.0],
                                             "u": pa.array([1, 1], pa.int64())}))
    register(pg, registry, "z", source="z", key=["id"], cursor="u")
    refresh_table("z")
    put_table(source, "z", fields, pa.table({"id": pa.array([1, 2], pa.int64()), "f": [-0.0, 0.0],
                                             "u": pa.array([2, 2], pa.int64())}))
    refresh_table("z")
    got = pg.execute(f'SELECT id, f::text FROM "{registry}".z ORDER BY id').fetchall()
    assert got == [(1, "-0"), (2, "0")]
    assert_same_rows(source_rows(source, "z"), pg_rows(pg, f'"{registry}".z', "id"), ["id"])


def test_the_reconciliation_refuses_a_publish_that_loses_rows(source: BigQuerySource, registry: str,
                                                              pg: psycopg.Connection[Any]) -> None:
    """A loss no other check sees (a user's trigger deletes a neighbour of every updated row): the per-period
    count inside the publish transaction differs from BigQuery's, the publish is rolled back, the error names
    the period and both figures."""
    rows = eight_weeks(400)
    put(source, rows)
    window_table(pg, registry)
    refresh_table("sqp")
    pg.execute(f'''CREATE FUNCTION "{registry}".eat() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
        DELETE FROM "{registry}".sqp WHERE start_date = NEW.start_date AND search_query <> NEW.search_query
          AND asin = (SELECT min(asin) FROM "{registry}".sqp WHERE start_date = NEW.start_date); RETURN NULL; END $$''')
    pg.execute(f'CREATE TRIGGER eat AFTER UPDATE ON "{registry}".sqp FOR EACH ROW WHEN (pg_trigger_depth() = 0)'
               f' EXECUTE FUNCTION "{registry}".eat()')
    before = live(pg, registry)
    changed = next(r for r in rows if r["start_date"] == date(2025, 1, 12))
    changed["impressions"] += 1
    changed["updated_at"] = T0 + timedelta(days=9)
    put(source, rows)
    with pytest.raises(QualityCheckFailed, match=r"reconciliation.*start_date = 2025-01-12: target \d+ rows, source 50"):
        refresh_table("sqp")
    assert live(pg, registry) == before
    audit = pg.execute(f'SELECT status FROM "{registry}".refresh_audit_log ORDER BY id DESC LIMIT 1').fetchone()
    assert audit == ("failed",)
    check = pg.execute(f"SELECT is_within_threshold FROM \"{registry}\".refresh_data_quality"
                       " WHERE metric_name = 'reconciliation' ORDER BY id DESC LIMIT 1").fetchone()
    assert check == (False,)


def test_full_mode_and_delete_reconciliation_prove_the_whole_table(source: BigQuerySource, registry: str,
                                                                   pg: psycopg.Connection[Any]) -> None:
    put(source, eight_weeks(300))
    register(pg, registry, "sqp", source="sqp", key=SQP_KEY, cursor="updated_at",
             delete_policy={"mode": "hard"})
    refresh_table("sqp")
    rows = eight_weeks(300)[:-3]
    put(source, rows)
    result = refresh_table("sqp")
    assert result["rows_deleted"] == 3
    check = pg.execute(f"SELECT is_within_threshold FROM \"{registry}\".refresh_data_quality"
                       " WHERE metric_name = 'reconciliation' ORDER BY id DESC LIMIT 1").fetchone()
    assert check == (True,)
    assert_same_rows(source_rows(source, "sqp"), live(pg, registry), SQP_KEY)


def test_maintenance_keeps_every_table_of_an_active_run(registry: str, pg: psycopg.Connection[Any]) -> None:
    staging = registry + "_staging"
    pg.execute(f'CREATE SCHEMA IF NOT EXISTS "{staging}"')
    for t in run_tables("active__1234abcd") + run_tables("gone__5678abcd"):
        pg.execute(f'CREATE TABLE "{staging}"."{t}" (h bigint)')
    pg.execute(f'INSERT INTO "{registry}".refresh_checkpoints (function_name, table_schema, table_name,'
               " checkpoint_data, status, expires_at) VALUES ('refresh_table', 's', 't',"
               " '{\"plan\": {\"staging_table\": \"active__1234abcd\"}}', 'active', now() + interval '1 hour')")
    assert sorted(drop_orphaned_staging(pg, registry, staging)) == sorted(run_tables("gone__5678abcd"))
    left = {r[0] for r in pg.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (staging,))}
    assert left == set(run_tables("active__1234abcd"))


def test_a_numeric_window_value_round_trips(source: BigQuerySource, registry: str, pg: psycopg.Connection[Any]) -> None:
    """Periods are matched between BigQuery and PostgreSQL by value for every window type used here."""
    fields = bq_schema([("id", "INT64"), ("period", "INT64"), ("v", "NUMERIC"), ("u", "INT64")])
    data = pa.table({"id": pa.array(range(20), pa.int64()), "period": pa.array([i % 4 for i in range(20)], pa.int64()),
                     "v": pa.array([Decimal(i) for i in range(20)], pa.decimal128(38, 9)),
                     "u": pa.array([1] * 20, pa.int64())})
    put_table(source, "p", fields, data)
    register(pg, registry, "p", source="p", key=["id"], cursor="u", mode="window", window_column="period")
    refresh_table("p")
    put_table(source, "p", fields, data.filter(pa.compute.not_equal(data["id"], 5)))  # a silent delete in period 1
    assert refresh_table("p")["rows_deleted"] == 1
    assert_same_rows(source_rows(source, "p"), pg_rows(pg, f'"{registry}".p', "id"), ["id"])


def test_a_column_added_by_drift_is_filled_for_every_row(source: BigQuerySource, registry: str,
                                                         pg: psycopg.Connection[Any]) -> None:
    """Old rows outside the lookback get the new column's values too (the demo left 275,000 rows NULL)."""
    rows = sqp_rows(400, weeks=8, step=timedelta(minutes=1)).to_pylist()  # 400 minutes of cursor values
    put(source, rows)
    register(pg, registry, "sqp", source="sqp", key=SQP_KEY, cursor="updated_at", lookback="1h")
    refresh_table("sqp")
    fields = [*SQP_SCHEMA, *bq_schema([("brand", "STRING")])]
    data = pa.Table.from_pylist(rows, schema=sqp_rows(1).schema)
    data = data.append_column("brand", pa.array([f"brand {i % 7}" for i in range(len(rows))]))
    put_table(source, "sqp", fields, data)
    result = refresh_table("sqp")
    assert result["drift"]["backfill"] == ["brand"], result["drift"]
    assert result["rows_updated"] == 400
    assert_same_rows(source_rows(source, "sqp"), live(pg, registry), SQP_KEY)
    # recorded: the next run reads only the lookback again
    assert refresh_table("sqp")["rows_read"] == 61


def test_a_future_dated_cursor_is_loaded_alerted_and_does_not_hide_later_rows(
    source: BigQuerySource, registry: str, pg: psycopg.Connection[Any], webhook: WebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REFRESH_WEBHOOK_URL", webhook.url)
    now = datetime.now(UTC)
    rows = sqp_rows(50, updated=now - timedelta(days=2)).to_pylist()
    rows[0]["updated_at"] = now + timedelta(days=30)  # a typo in the source: a cursor a month ahead
    put(source, rows)
    register(pg, registry, "sqp", source="sqp", key=SQP_KEY, cursor="updated_at")
    first = refresh_table("sqp")
    assert first["future_cursor_rows"] == 1 and first["status"] == "warning"
    assert "future_cursor" in webhook.events()
    wm = pg.execute(f'SELECT watermark FROM "{registry}".refresh_config').fetchone()
    assert wm is not None and datetime.fromisoformat(wm[0]) <= datetime.now(UTC)  # held at the read snapshot
    late = dict(rows[1], search_query="arrived later", updated_at=datetime.now(UTC))  # after the first read
    put(source, [*rows, late])
    second = refresh_table("sqp")
    assert second["rows_inserted"] == 1  # with the watermark a month ahead this row was never read
    assert_same_rows(source_rows(source, "sqp"), live(pg, registry), SQP_KEY)


def test_watermark_caps_per_cursor_type() -> None:
    from tasks.extract import cap_watermark

    snap = datetime(2026, 3, 1, 23, 30, tzinfo=UTC)
    assert cap_watermark("2026-04-01 00:00:00+00", "TIMESTAMP", snap, "UTC") == snap.isoformat()
    assert cap_watermark("2026-02-01 00:00:00+00", "TIMESTAMP", snap, "UTC") == "2026-02-01 00:00:00+00"
    assert cap_watermark("2026-03-02", "DATE", snap, "UTC") == "2026-03-01"
    assert cap_watermark("2026-03-02", "DATE", snap, "Asia/Tokyo") == "2026-03-02"  # already the 2nd in Tokyo
    assert cap_watermark("2026-03-01T23:59:00", "DATETIME", snap, "America/New_York") == "2026-03-01T18:30:00"
    assert cap_watermark("99999", "INT64", snap, "UTC") == "99999"


@pytest.mark.parametrize("policy", ["hard", "soft"])
def test_a_key_deleted_then_re_added_with_an_older_cursor_comes_back(
    source: BigQuerySource, registry: str, pg: psycopg.Connection[Any], policy: str,
) -> None:
    rows = sqp_rows(300, weeks=3, step=timedelta(minutes=1)).to_pylist()
    put(source, rows)
    register(pg, registry, "sqp", source="sqp", key=SQP_KEY, cursor="updated_at", delete_policy={"mode": policy})
    refresh_table("sqp")
    gone = rows[10]  # an old row: its cursor is far behind the watermark
    put(source, [r for r in rows if r is not gone])
    assert refresh_table("sqp")["rows_deleted"] == 1
    put(source, rows)  # re-added as it was, its old cursor included
    back = refresh_table("sqp")
    assert back["status"] == "success", back
    assert back["rows_inserted" if policy == "hard" else "rows_updated"] == 1
    ignore = {"deleted_at"} if policy == "soft" else set()
    if policy == "soft":
        assert pg.execute(f'SELECT count(*) FROM "{registry}".sqp WHERE deleted_at IS NOT NULL').fetchone() == (0,)
    assert_same_rows(source_rows(source, "sqp"), live(pg, registry), SQP_KEY, ignore=ignore)


def test_a_commit_whose_answer_is_lost_is_found_landed_and_not_published_twice(
    source: BigQuerySource, registry: str, pg: psycopg.Connection[Any], pg_uri: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The publish's COMMIT reaches the server, which commits; the connection drops before the answer. The
    retried publish must find out that it landed and record the truth: one success, nothing written twice."""
    from tests.pgproxy import CommitCutter

    rows = eight_weeks(400)
    put(source, rows)
    register(pg, registry, "sqp", source="sqp", key=SQP_KEY, cursor="updated_at")
    refresh_table("sqp")
    for r in rows[:40]:
        r["impressions"] += 1
        r["updated_at"] = T0 + timedelta(days=3)
    added = [dict(rows[0], search_query=f"added {i}", updated_at=T0 + timedelta(days=3)) for i in range(25)]
    put(source, rows + added)
    cutter = CommitCutter(pg_uri, marker=b"WITH up AS (INSERT")
    monkeypatch.setenv("BQ_REFRESH_DATABASE_URL", cutter.uri)
    monkeypatch.setenv("REFRESH_RETRIES", "2")
    monkeypatch.setenv("REFRESH_RETRY_DELAY_SECONDS", "0.2")

    def inserted_so_far() -> int:
        row = pg.execute("SELECT n_tup_ins FROM pg_stat_user_tables WHERE schemaname = %s AND relname = 'sqp'",
                         (registry,)).fetchone()
        return int(row[0]) if row else -1

    def inserted_at_least(count: int) -> int:
        """n_tup_ins once it shows ``count``: a server session reports its statistics a little after its
        transactions (one a pooler keeps open, as in the Supabase-like pass, not at its client's exit)."""
        deadline = time.monotonic() + 15
        while inserted_so_far() < count and time.monotonic() < deadline:
            time.sleep(0.2)
        return inserted_so_far()

    before_ins = inserted_at_least(400)  # the first run's
    cutter.armed = True
    try:
        result = refresh_table("sqp")
    finally:
        cutter.close()
    assert cutter.cuts == 1  # the answer to the publish's COMMIT was lost once
    assert result["status"] == "success", result
    assert (result["rows_inserted"], result["rows_updated"]) == (25, 40)
    audit = pg.execute(f'SELECT status, rows_inserted, rows_updated FROM "{registry}".refresh_audit_log'
                       " ORDER BY id").fetchall()
    assert audit[-1] == ("success", 25, 40) and [a[0] for a in audit].count("success") == 2, audit
    # The statistics are flushed a little after the transactions: wait until they settle, then the table
    # has taken exactly the 25 inserts of one publish (a second publish would have tried them again).
    inserted_at_least(before_ins + 25)
    time.sleep(1.5)
    assert inserted_so_far() - before_ins == 25
    writers = pg.execute(f"SELECT count(DISTINCT xmin::text) FROM \"{registry}\".sqp WHERE updated_at = %s",
                         (T0 + timedelta(days=3),)).fetchone()
    assert writers == (1,)  # every changed row written by one transaction
    assert_same_rows(source_rows(source, "sqp"), live(pg, registry), SQP_KEY)
