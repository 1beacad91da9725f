"""A table the users declared narrower than bq-refresh's type contract (``integer`` for INT64, ``character
varying(n)`` for STRING, ``numeric(p,s)`` for NUMERIC, another column order, a unique index instead of a primary
key, a column of their own): loaded through staging (never the binary COPY of the direct load), every value
checked against the declared type first. Values that fit land exactly (compared with BigQuery value by value); a
value that does not fit fails the table naming the column, its declared type, a key and the value, with nothing
published (PostgreSQL would raise for some and silently round others)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pyarrow as pa
import pytest

from blocks import BigQuerySource
from bq_refresh.errors import QualityCheckFailed, SourceError
from bq_refresh.settings import Settings
from flows.refresh_table import refresh_table
from tasks.registry import register_table
from tests.bqdata import assert_same_rows, bq_schema, pg_rows, put_table, source_rows
from tests.test_engine import SQP_KEY, SQP_SCHEMA, sqp_rows

pytestmark = [pytest.mark.emulator, pytest.mark.usefixtures("prefect_harness")]

USERS_DDL = """CREATE TABLE "{s}".sqp (
    note text DEFAULT 'made by hand',
    asin character varying(12) NOT NULL, start_date date NOT NULL, search_query character varying(40) NOT NULL,
    impressions integer, click_share numeric(12,9), median_price numeric(20,9), updated_at timestamptz)"""


def users_table(pg: psycopg.Connection[Any], s: str) -> None:
    pg.execute(USERS_DDL.format(s=s))
    pg.execute(f'CREATE UNIQUE INDEX sqp_key ON "{s}".sqp (start_date, asin, search_query)')


def live(pg: psycopg.Connection[Any], s: str) -> list[dict[str, Any]]:
    return pg_rows(pg, f'"{s}".sqp', "start_date, asin, search_query")


def with_value(rows: pa.Table, column: str, at: int, value: Any) -> pa.Table:
    values = rows.column(column).to_pylist()
    values[at] = value
    return rows.set_column(rows.schema.get_field_index(column), column,
                           pa.array(values, rows.schema.field(column).type))


def test_values_that_fit_the_declared_types_land_exactly_through_staging(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource,
) -> None:
    s = registry
    users_table(pg, s)
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(300))
    register_table(pg, s, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})
    run = refresh_table("sqp")
    assert run["status"] == "success" and run["direct_load"] is False and run["rows_inserted"] == 300
    rows = live(pg, s)
    assert {r["note"] for r in rows} == {"made by hand"}  # their own column, untouched
    assert_same_rows(source_rows(source, "sqp"), rows, SQP_KEY, ignore={"note"})
    declared = dict(pg.execute("SELECT column_name, data_type FROM information_schema.columns"
                               " WHERE table_schema = %s AND table_name = 'sqp'", (s,)).fetchall())
    assert declared["impressions"] == "integer" and declared["asin"] == "character varying"  # DDL unchanged


@pytest.mark.parametrize(("column", "value", "says"), [
    ("impressions", 3_000_000_000, "impressions is declared integer"),
    ("search_query", "q" * 41, "search_query is declared character varying(40)"),
    ("median_price", Decimal("12345678901234.123456789"), "median_price is declared numeric(20,9)"),
    ("click_share", Decimal("0.5000000001").quantize(Decimal("0.000000001")) + Decimal(1000), "click_share is declared"),
], ids=["int4-range", "varchar-length", "numeric-precision", "numeric-precision-small"])
def test_a_value_the_declared_column_cannot_hold_fails_the_table_naming_it_and_publishes_nothing(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource,
    column: str, value: Any, says: str,
) -> None:
    s = registry
    users_table(pg, s)
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(200))
    register_table(pg, s, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})
    assert refresh_table("sqp")["status"] == "success"
    before = live(pg, s)
    put_table(source, "sqp", SQP_SCHEMA, with_value(sqp_rows(200), column, 7, value))
    register_table(pg, s, "sqp", {"source": "sqp", "key": SQP_KEY, "mode": "full"})
    with pytest.raises(QualityCheckFailed, match=re.escape(says) + r".*1 value\(s\) it cannot hold, e\.g\. "
                       + re.escape(str(value)[:12])):
        refresh_table("sqp")
    assert_same_rows(before, live(pg, s), SQP_KEY, ignore=())  # nothing published
    failed = pg.execute(f'SELECT metric_name FROM "{s}".refresh_data_quality WHERE NOT is_within_threshold').fetchall()
    assert (f"fits:{column}",) in failed


STAMPED_SCHEMA = bq_schema([("id", "INT64", "REQUIRED"), ("at", "TIMESTAMP"), ("ratio", "FLOAT64")])
STAMPED_DDL = """CREATE TABLE "{s}".stamped (id integer PRIMARY KEY, at timestamp without time zone,
    ratio numeric(12,4), created_at timestamptz NOT NULL DEFAULT now())"""
# Across New York's switch to summer time (2026-03-08 07:00 UTC); every float has a fifth decimal 5.
STAMPS = [datetime(2026, 3, 8, 6, 30, tzinfo=UTC) + timedelta(minutes=7 * i, microseconds=i) for i in range(40)]


def stamped_rows(bump: int = -1) -> pa.Table:
    return pa.table({"id": pa.array(range(40), pa.int64()),
                     "at": pa.array([t + (timedelta(hours=1) if i == bump else timedelta(0)) for i, t in enumerate(STAMPS)],
                                    pa.timestamp("us", tz="UTC")),
                     "ratio": pa.array([0.00005 + i / 8 + (1.0 if i == bump else 0.0) for i in range(40)], pa.float64())})


@pytest.mark.parametrize("zone", ["UTC", "America/New_York"])
def test_timestamps_land_as_wall_times_of_the_tables_zone_and_floats_round_to_the_declared_scale(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource, zone: str,
) -> None:
    """TIMESTAMP into ``timestamp without time zone`` is the wall time in the table's ``target_timezone`` (UTC by
    default), whatever TimeZone the role's sessions default to; FLOAT64 into ``numeric(12,4)`` rounds half away
    from zero and the rounded rows are counted. Compared with BigQuery under the declared types; a reload of one
    changed row rewrites that row alone."""
    s = registry
    pg.execute(STAMPED_DDL.format(s=s))
    role = pg.execute("SELECT current_user").fetchone()
    assert role is not None
    pg.execute(psycopg.sql.SQL("ALTER ROLE {} SET TimeZone = 'Asia/Kathmandu'").format(psycopg.sql.Identifier(role[0])))
    try:
        put_table(source, "stamped", STAMPED_SCHEMA, stamped_rows())
        register_table(pg, s, "stamped", {"source": "stamped", "key": ["id"], "cursor": "at", "target_timezone": zone})
        first = refresh_table("stamped")
        assert (first["status"], first["direct_load"], first["rows_inserted"]) == ("success", False, 40), first
        declared = {"at": "timestamp without time zone", "ratio": "numeric(12,4)"}
        rows = pg_rows(pg, f'"{s}".stamped', "id")
        assert_same_rows(source_rows(source, "stamped"), rows, ["id"], ignore={"created_at"},
                         declared=declared, target_timezone=zone)
        wall = {"UTC": (datetime(2026, 3, 8, 6, 58, 0, 4), datetime(2026, 3, 8, 7, 33, 0, 9)),
                "America/New_York": (datetime(2026, 3, 8, 1, 58, 0, 4), datetime(2026, 3, 8, 3, 33, 0, 9))}
        assert (rows[4]["at"], rows[9]["at"]) == wall[zone]  # either side of New York's switch to summer time
        assert rows[0]["ratio"] == Decimal("0.0001")  # 0.00005 rounds half away from zero
        rounded = pg.execute(f"SELECT metric_value FROM \"{s}\".refresh_data_quality WHERE metric_name = 'rounded:ratio'"
                             " ORDER BY id DESC LIMIT 1").fetchone()
        assert rounded is not None and rounded[0] == 40  # every value had a fifth decimal

        pg.execute(f'CREATE TABLE "{s}".fired (n int)')
        pg.execute(f'CREATE FUNCTION "{s}".count_update() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN'
                   f' INSERT INTO "{s}".fired VALUES (1); RETURN NEW; END $$')
        pg.execute(f'CREATE TRIGGER on_update AFTER UPDATE ON "{s}".stamped FOR EACH ROW'
                   f' EXECUTE FUNCTION "{s}".count_update()')
        put_table(source, "stamped", STAMPED_SCHEMA, stamped_rows(bump=39))
        second = refresh_table("stamped")
        assert (second["rows_inserted"], second["rows_updated"]) == (0, 1), second
        assert pg.execute(f'SELECT count(*) FROM "{s}".fired').fetchone() == (1,)
        assert_same_rows(source_rows(source, "stamped"), pg_rows(pg, f'"{s}".stamped', "id"), ["id"],
                         ignore={"created_at"}, declared=declared, target_timezone=zone)
    finally:
        pg.execute(psycopg.sql.SQL("ALTER ROLE {} RESET TimeZone").format(psycopg.sql.Identifier(role[0])))


def test_a_timestamp_key_declared_without_time_zone_refuses_another_zone(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource,
) -> None:
    s = registry
    pg.execute(f'CREATE TABLE "{s}".stamped (id integer, at timestamp without time zone, ratio float8,'
               " PRIMARY KEY (id, at))")
    put_table(source, "stamped", STAMPED_SCHEMA, stamped_rows())
    register_table(pg, s, "stamped", {"source": "stamped", "key": ["id", "at"], "mode": "full",
                                      "target_timezone": "Europe/Berlin"})
    with pytest.raises(SourceError, match=r"key column\(s\) at of .*stamped are declared timestamp without time zone"):
        refresh_table("stamped")
    assert pg.execute(f'SELECT count(*) FROM "{s}".stamped').fetchone() == (0,)
