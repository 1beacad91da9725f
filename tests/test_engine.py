"""The sync engine end to end: emulator -> Storage Read -> Polars -> ADBC staging -> publish."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pyarrow as pa
import pytest

from blocks import BigQuerySource
from bq_refresh.errors import ConfigError, SchemaDriftError, SourceError
from bq_refresh.settings import Settings
from flows.refresh_table import refresh_table
from tasks.load import rowhash_table
from tasks.registry import register_table
from tests.bqdata import assert_same_rows, bq_schema, pg_rows, put_table, source_rows

pytestmark = [pytest.mark.emulator, pytest.mark.usefixtures("prefect_harness")]

T0 = datetime(2025, 1, 5, 12, 0, tzinfo=UTC)

SQP_SCHEMA = bq_schema([
    ("start_date", "DATE", "REQUIRED"), ("asin", "STRING", "REQUIRED"), ("search_query", "STRING", "REQUIRED"),
    ("impressions", "INT64"), ("click_share", "NUMERIC"), ("median_price", "NUMERIC"), ("updated_at", "TIMESTAMP"),
])


def sqp_rows(n: int, *, updated: datetime = T0, weeks: int = 2, price_bump: Decimal = Decimal(0),
             step: timedelta = timedelta(microseconds=1)) -> pa.Table:
    rows: dict[str, list[Any]] = {k: [] for k in ("start_date", "asin", "search_query", "impressions",
                                                   "click_share", "median_price", "updated_at")}
    for i in range(n):
        rows["start_date"].append(date(2025, 1, 5) + timedelta(weeks=i % weeks))
        rows["asin"].append(f"B0{i % 97:08d}")
        rows["search_query"].append(f"query {i // 97}")
        rows["impressions"].append(1000 + i)
        rows["click_share"].append(Decimal(i % 1000) / Decimal(1000))
        rows["median_price"].append(Decimal("19.990000001") + price_bump + Decimal(i) / 100)
        rows["updated_at"].append(updated + step * i)
    return pa.table({
        "start_date": pa.array(rows["start_date"], pa.date32()), "asin": rows["asin"],
        "search_query": rows["search_query"], "impressions": pa.array(rows["impressions"], pa.int64()),
        "click_share": pa.array(rows["click_share"], pa.decimal128(38, 9)),
        "median_price": pa.array(rows["median_price"], pa.decimal128(38, 9)),
        "updated_at": pa.array(rows["updated_at"], pa.timestamp("us", tz="UTC")),
    })


SQP_KEY = ["start_date", "asin", "search_query"]


def register(pg: psycopg.Connection[Any], schema: str, name: str, **params: Any) -> None:
    register_table(pg, schema, name, params)


def test_incremental_sync_is_exact_and_a_rerun_changes_nothing(
    source: BigQuerySource, registry: str, pg: psycopg.Connection[Any]
) -> None:
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(500))
    register(pg, registry, "sqp", source="sqp", key=SQP_KEY, cursor="updated_at", batch_size=128)

    first = refresh_table("sqp")
    assert first["status"] == "success"
    assert (first["rows_read"], first["rows_inserted"], first["rows_updated"]) == (500, 500, 0)
    assert first["batches"] >= 4
    assert_same_rows(source_rows(source, "sqp"), pg_rows(pg, f'"{registry}".sqp', "1"), SQP_KEY)

    again = refresh_table("sqp")
    assert (again["rows_inserted"], again["rows_updated"], again["rows_deleted"]) == (0, 0, 0)
    audit = pg.execute(
        f'SELECT status, rows_processed, rows_inserted, bigquery_job_id, memory_used_mb FROM "{registry}".refresh_audit_log ORDER BY id'
    ).fetchall()
    assert [a[0] for a in audit] == ["success", "success"]
    assert audit[0][1] == 500 and audit[0][2] == 500 and audit[0][3] and audit[0][4] > 0
    staging_left = pg.execute(
        "SELECT array_agg(tablename::text) FROM pg_tables WHERE schemaname = %s", (f"{registry}_staging",)
    ).fetchone()
    assert staging_left is not None and [t for t in staging_left[0] if not t.endswith("_rowhash")] == []
    assert [t for t in staging_left[0] if t.endswith("_rowhash")] == [rowhash_table(registry, "sqp")]


ALL_TYPES_SCHEMA = bq_schema([
    ("id", "INT64", "REQUIRED"), ("i", "INT64"), ("f", "FLOAT64"), ("n", "NUMERIC"), ("b", "BOOL"),
    ("s", "STRING"), ("by", "BYTES"), ("d", "DATE"), ("dt", "DATETIME"), ("ts", "TIMESTAMP"), ("tm", "TIME"),
    ("j", "JSON"), ("arr", "INT64", "REPEATED"), ("sarr", "STRING", "REPEATED"),
])


def all_types_table() -> pa.Table:
    from datetime import time

    big = "x" * (1024 * 1024)
    ids = [1, 2, 3, 4]
    return pa.table({
        "id": pa.array(ids, pa.int64()),
        "i": pa.array([-(2**63), 2**63 - 1, 0, None], pa.int64()),
        "f": pa.array([1.5, -0.0, 1e308, None], pa.float64()),
        "n": pa.array([Decimal("99999999999999999999999999999.999999999"),
                       Decimal("-99999999999999999999999999999.999999999"), Decimal("0.000000001"), None],
                      pa.decimal128(38, 9)),
        "b": [True, False, None, True],
        "s": ["héllo ☃ \"quoted\" 'single' \\ back", big, "", None],
        "by": [b"\x00\x01\xff", b"", None, bytes(range(256))],
        "d": pa.array([date(1, 1, 1), date(9999, 12, 31), date(2024, 2, 29), None], pa.date32()),
        "dt": pa.array([datetime(1, 1, 1), datetime(9999, 12, 31, 23, 59, 59, 999999), datetime(2024, 1, 1, 0, 0, 0, 1), None],
                       pa.timestamp("us")),
        "ts": pa.array([datetime(1970, 1, 1, tzinfo=UTC), datetime(2024, 6, 30, 23, 59, 59, 999999, tzinfo=UTC),
                        datetime(2000, 1, 1, 0, 0, 0, 1, tzinfo=UTC), None], pa.timestamp("us", tz="UTC")),
        "tm": pa.array([time(0, 0), time(23, 59, 59, 999999), time(12, 0, 0, 1), None], pa.time64("us")),
        "j": ['{"a": 1, "b": [1, 2, {"c": "ü"}]}', "[]", '"text"', None],
        "arr": [[1, 2, 3], [], [2**62], []],
        "sarr": [["a", "b"], [], ["ü"], []],
    })


def test_every_type_round_trips_exactly(source: BigQuerySource, registry: str, pg: psycopg.Connection[Any]) -> None:
    put_table(source, "all_types", ALL_TYPES_SCHEMA, all_types_table())
    register(pg, registry, "all_types", source="all_types", key=["id"], mode="full")
    assert refresh_table("all_types")["rows_inserted"] == 4

    types = dict(pg.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = %s AND table_name = 'all_types'",
        (registry,),
    ).fetchall())
    assert types == {
        "id": "bigint", "i": "bigint", "f": "double precision", "n": "numeric", "b": "boolean", "s": "text",
        "by": "bytea", "d": "date", "dt": "timestamp without time zone", "ts": "timestamp with time zone",
        "tm": "time without time zone", "j": "jsonb", "arr": "ARRAY", "sarr": "ARRAY",
    }
    precision = pg.execute(
        "SELECT numeric_precision, numeric_scale FROM information_schema.columns"
        " WHERE table_schema = %s AND table_name = 'all_types' AND column_name = 'n'", (registry,)).fetchone()
    assert precision == (38, 9)
    expected = all_types_table().to_pylist()
    for row in expected:
        row["j"] = None if row["j"] is None else json.loads(row["j"])
    actual = pg_rows(pg, f'"{registry}".all_types', "id")
    assert_same_rows(expected, actual, ["id"])
    assert_same_rows(source_rows(source, "all_types"), actual, ["id"])  # the BigQuery client's own types too
    assert pg.execute(f'SELECT count(*) FROM "{registry}".all_types WHERE i IS NULL AND n IS NULL').fetchone() == (1,)


def test_late_rows_inside_the_lookback_are_picked_up(source: BigQuerySource, registry: str, pg: psycopg.Connection[Any]) -> None:
    minute = timedelta(minutes=1)
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(200, step=minute))
    register(pg, registry, "sqp", source="sqp", key=SQP_KEY, cursor="updated_at", lookback="1h")
    refresh_table("sqp")
    watermark = pg.execute(f'SELECT watermark FROM "{registry}".refresh_config').fetchone()
    assert watermark is not None and watermark[0].startswith("2025-01-05 15:19:00")

    # A row that arrives late (its cursor 30 min behind the watermark: inside the 1 h lookback),
    # a changed row with a fresh cursor, and unchanged rows.
    data = sqp_rows(200, step=minute).to_pylist()
    data.append({**data[0], "search_query": "late arrival", "updated_at": T0 + 199 * minute - 30 * minute})
    data[5] = {**data[5], "impressions": 7, "updated_at": T0 + timedelta(days=1)}
    put_table(source, "sqp", SQP_SCHEMA, pa.Table.from_pylist(data, schema=sqp_rows(1).schema))
    second = refresh_table("sqp")
    assert (second["rows_inserted"], second["rows_updated"]) == (1, 1)
    # the last hour of rows with the floor's own minute (the read is inclusive), the late one, the changed one
    assert second["rows_read"] == 61 + 1 + 1
    assert_same_rows(source_rows(source, "sqp"), pg_rows(pg, f'"{registry}".sqp', "1"), SQP_KEY)


def test_window_mode_replaces_restated_periods(source: BigQuerySource, registry: str, pg: psycopg.Connection[Any]) -> None:
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(300, weeks=3))
    register(pg, registry, "sqp", source="sqp", key=SQP_KEY, cursor="updated_at", mode="window",
             window_column="start_date")
    refresh_table("sqp")
    # Amazon restates the second week: one row vanishes, one changes, all get a new updated_at.
    rows = sqp_rows(300, weeks=3).to_pylist()
    week2 = date(2025, 1, 12)
    restated = [r for r in rows if r["start_date"] == week2]
    dropped = restated[0]
    rows = [r for r in rows if r is not dropped]
    for r in rows:
        if r["start_date"] == week2:
            r["updated_at"] = T0 + timedelta(days=7)
    restated[1]["median_price"] = Decimal("1.000000001")
    put_table(source, "sqp", SQP_SCHEMA, pa.Table.from_pylist(rows, schema=sqp_rows(1).schema))
    result = refresh_table("sqp")
    # the 99 surviving rows of the week carry a new updated_at, so they all changed; the dropped one goes
    assert (result["rows_inserted"], result["rows_updated"], result["rows_deleted"]) == (0, 99, 1)
    # the restated week, and the week holding the watermark's own cursor value (re-read whole, every row of it
    # found unchanged by its hash)
    assert result["rows_read"] == 99 + 100
    assert result["rows_skipped_unchanged"] == 100
    assert_same_rows(source_rows(source, "sqp"), pg_rows(pg, f'"{registry}".sqp', "1"), SQP_KEY)


@pytest.mark.parametrize("policy", ["hard", "soft"])
def test_deletes_are_reconciled(source: BigQuerySource, registry: str, pg: psycopg.Connection[Any], policy: str) -> None:
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(100))
    register(pg, registry, "sqp", source="sqp", key=SQP_KEY, cursor="updated_at",
             delete_policy={"mode": policy})
    refresh_table("sqp")
    rows = sqp_rows(100).to_pylist()
    gone = rows.pop(10)
    put_table(source, "sqp", SQP_SCHEMA, pa.Table.from_pylist(rows, schema=sqp_rows(1).schema))
    result = refresh_table("sqp")
    assert result["rows_deleted"] == 1 and result["rows_inserted"] == 0
    live = pg.execute(f'SELECT count(*) FROM "{registry}".sqp').fetchone()
    flagged = pg.execute(
        f'SELECT deleted_at IS NOT NULL FROM "{registry}".sqp WHERE asin = %s AND search_query = %s AND start_date = %s',
        (gone["asin"], gone["search_query"], gone["start_date"]),
    ).fetchone() if policy == "soft" else None
    if policy == "hard":
        assert live == (99,)
    else:
        assert live == (100,) and flagged == (True,)


def test_duplicate_and_null_keys(source: BigQuerySource, registry: str, pg: psycopg.Connection[Any]) -> None:
    schema = bq_schema([("id", "INT64"), ("v", "STRING"), ("updated_at", "TIMESTAMP")])
    data = pa.table({
        "id": pa.array([1, 1, 2, None, None], pa.int64()),
        "v": ["old", "new", "two", "orphan-a", "orphan-b"],
        "updated_at": pa.array([T0, T0 + timedelta(seconds=1), T0, T0, T0], pa.timestamp("us", tz="UTC")),
    })
    put_table(source, "dupes", schema, data)
    register(pg, registry, "dupes", source="dupes", key=["id"], cursor="updated_at")
    result = refresh_table("dupes")
    assert result["status"] == "warning"
    assert result["duplicate_keys"] == 1 and result["rows_quarantined"] == 2
    assert pg.execute(f'SELECT id, v FROM "{registry}".dupes ORDER BY id').fetchall() == [(1, "new"), (2, "two")]
    quarantined = pg.execute(f'SELECT row_data->>\'v\' FROM "{registry}".refresh_quarantine ORDER BY 1').fetchall()
    assert quarantined == [("orphan-a",), ("orphan-b",)]


@pytest.mark.parametrize("policy", ["evolve", "freeze"])
def test_schema_drift_follows_the_policy(source: BigQuerySource, registry: str, pg: psycopg.Connection[Any], policy: str) -> None:
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(50))
    register(pg, registry, "sqp", source="sqp", key=SQP_KEY, cursor="updated_at", drift_policy=policy)
    refresh_table("sqp")
    data = sqp_rows(50, updated=T0 + timedelta(days=1)).append_column("currency", pa.array(["USD"] * 50))
    put_table(source, "sqp", [*SQP_SCHEMA, *bq_schema([("currency", "STRING")])], data)
    if policy == "freeze":
        with pytest.raises(SchemaDriftError, match="currency"):
            refresh_table("sqp")
        cols = [r[0] for r in pg.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = 'sqp'", (registry,))]
        assert "currency" not in cols
        audit = pg.execute(f'SELECT status, error_message FROM "{registry}".refresh_audit_log ORDER BY id DESC LIMIT 1').fetchone()
        assert audit is not None and audit[0] == "failed" and "currency" in audit[1]
    else:
        result = refresh_table("sqp")
        assert result["drift"]["columns_added"] == ["currency"]
        assert result["rows_updated"] == 50
        assert pg.execute(f'SELECT count(*) FROM "{registry}".sqp WHERE currency = \'USD\'').fetchone() == (50,)


def test_a_changed_column_type_always_stops(source: BigQuerySource, registry: str, pg: psycopg.Connection[Any]) -> None:
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(20))
    register(pg, registry, "sqp", source="sqp", key=SQP_KEY, cursor="updated_at")
    refresh_table("sqp")
    before = pg_rows(pg, f'"{registry}".sqp', "1")
    changed = [f if f.name != "impressions" else bq_schema([("impressions", "STRING")])[0] for f in SQP_SCHEMA]
    data = sqp_rows(20).set_column(3, "impressions", pa.array(["x"] * 20))
    put_table(source, "sqp", changed, data)
    with pytest.raises(SchemaDriftError, match="impressions: INT64/NULLABLE -> STRING"):
        refresh_table("sqp")
    assert pg_rows(pg, f'"{registry}".sqp', "1") == before


def test_bad_configuration_names_the_table_and_key(registry: str, pg: psycopg.Connection[Any], source: BigQuerySource) -> None:
    with pytest.raises(ConfigError, match=r"\.bad: invalid sync parameters: batch_sise: Extra inputs"):
        register(pg, registry, "bad", source="x", key=["id"], cursor="c", batch_sise=10)
    with pytest.raises(ConfigError, match="lookback"):
        register(pg, registry, "bad", source="x", key=["id"], cursor="c", lookback="a week")
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(5))
    register(pg, registry, "nocol", source="sqp", key=["nope"], mode="full")
    with pytest.raises(SourceError, match="column 'nope' not found"):
        refresh_table("nocol")
    register(pg, registry, "badcursor", source="sqp", key=SQP_KEY, cursor="asin")
    with pytest.raises(SourceError, match="cursor column 'asin' is STRING"):
        refresh_table("badcursor")
    register(pg, registry, "missing", source="no_such_table", key=["id"], mode="full")
    with pytest.raises(SourceError, match="not found"):
        refresh_table("missing")


def test_a_second_run_of_the_same_table_is_skipped(source: BigQuerySource, registry: str, pg: psycopg.Connection[Any],
                                                   env: Settings) -> None:
    from blocks import PostgresTarget
    from tasks.locks import table_lock

    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(5))
    register(pg, registry, "sqp", source="sqp", key=SQP_KEY, cursor="updated_at")
    assert env.database_url is not None
    with table_lock(PostgresTarget(url=env.database_url), f"{registry}.sqp", 1):
        result = refresh_table("sqp")
    assert result["status"] == "skipped" and "already running" in result["reason"]
    assert pg.execute("SELECT to_regclass(%s)", (f'"{registry}".sqp',)).fetchone() == (None,)
    audit = pg.execute(f'SELECT status FROM "{registry}".refresh_audit_log').fetchall()
    assert audit == [("skipped",)]
    assert refresh_table("sqp")["rows_inserted"] == 5
