"""Planner statistics after a publish: a load or a change of a large share of a table is followed by ANALYZE (after
the publish's COMMIT, recorded as ``analyzed`` in the audit row); a small change is left to autovacuum; an ANALYZE
that cannot run is recorded and never fails the run."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg
import pyarrow as pa
import pytest
from psycopg import sql

from blocks import BigQuerySource
from flows.refresh_table import refresh_table
from tasks.load import ANALYZE_LOCK_TIMEOUT, analyze_due
from tasks.registry import register_table
from tests.bqdata import put_table
from tests.test_engine import SQP_KEY, SQP_SCHEMA, sqp_rows


@pytest.mark.parametrize(("changed", "estimate", "fraction", "due"), [
    (0, 1000, 0.1, False),      # nothing changed
    (1, 1000, 0.1, False),      # a tiny change
    (100, 1000, 0.1, False),    # exactly the share: not more than it
    (101, 1000, 0.1, True),
    (500, -1, 0.1, True),       # never analyzed nor vacuumed (PostgreSQL 14+: -1)
    (500, 0, 0.1, True),        # an empty table that got rows
    (500, 500, 0.1, True),      # an initial load (the index build set reltuples to the rows loaded)
    (1, 1000, 0.0, True),       # 0: after every publish that changed anything
    (2000, 1000, 5.0, False),   # a share above 1: only much bigger changes
])
def test_analyze_due(changed: int, estimate: float, fraction: float, due: bool) -> None:
    assert analyze_due(changed, estimate, fraction) is due


def last_analyze(pg: psycopg.Connection[Any], schema: str, table: str) -> datetime | None:
    pg.execute("SELECT pg_stat_clear_snapshot()")
    row = pg.execute("SELECT last_analyze FROM pg_stat_user_tables WHERE schemaname = %s AND relname = %s",
                     (schema, table)).fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def audit_metadata(pg: psycopg.Connection[Any], schema: str, audit_id: int) -> dict[str, Any]:
    row = pg.execute(sql.SQL("SELECT sync_metadata FROM {} WHERE id = %s").format(
        sql.Identifier(schema, "refresh_audit_log")), (audit_id,)).fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


@pytest.mark.emulator
@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("direct", [True, False], ids=["direct initial load", "staged initial load"])
def test_a_load_is_analyzed_and_a_tiny_change_is_not(
    source: BigQuerySource, registry: str, pg: psycopg.Connection[Any], direct: bool,
) -> None:
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(500))
    register_table(pg, registry, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at",
                                         "direct_initial_load": direct})
    first = refresh_table("sqp")
    assert first["status"] == "success" and first["rows_inserted"] == 500 and first["direct_load"] is direct
    assert first["analyzed"] is True
    assert audit_metadata(pg, registry, first["audit_id"])["analyzed"] is True
    analyzed_at = last_analyze(pg, registry, "sqp")
    assert analyzed_at is not None
    reltuples = pg.execute("SELECT reltuples FROM pg_class WHERE oid = %s::regclass",
                           (f'"{registry}".sqp',)).fetchone()
    assert reltuples == (500.0,)  # the planner knows the rows the load brought

    # One row of 500 changes: 0.2 % of the table, under REFRESH_ANALYZE_CHANGED_FRACTION (10 %).
    changed = sqp_rows(500)
    later = changed.column("updated_at").to_pylist()
    later[7] = later[-1].replace(year=2026)
    prices = changed.column("median_price").to_pylist()
    prices[7] += Decimal(1)
    changed = changed.set_column(changed.schema.get_field_index("updated_at"), "updated_at",
                                 pa.array(later, pa.timestamp("us", tz="UTC")))
    changed = changed.set_column(changed.schema.get_field_index("median_price"), "median_price",
                                 pa.array(prices, pa.decimal128(38, 9)))
    put_table(source, "sqp", SQP_SCHEMA, changed)
    tiny = refresh_table("sqp")
    assert tiny["status"] == "success" and tiny["rows_updated"] == 1
    assert tiny["analyzed"] is False and audit_metadata(pg, registry, tiny["audit_id"])["analyzed"] is False
    assert last_analyze(pg, registry, "sqp") == analyzed_at

    # Every row changes: analyzed again.
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(500, updated=datetime(2026, 2, 1, tzinfo=UTC), price_bump=Decimal(2)))
    big = refresh_table("sqp")
    assert big["rows_updated"] == 500 and big["analyzed"] is True
    again = last_analyze(pg, registry, "sqp")
    assert again is not None and again > analyzed_at


@pytest.mark.emulator
@pytest.mark.usefixtures("prefect_harness")
def test_an_analyze_that_cannot_run_is_recorded_and_the_run_succeeds(
    source: BigQuerySource, registry: str, pg: psycopg.Connection[Any], pg_uri: str,
) -> None:
    """A VACUUM or an index build of the table holds a lock ANALYZE waits for: it gives up after
    ANALYZE_LOCK_TIMEOUT, the publish (which does not wait for that lock) stands and the audit row says so."""
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(300))
    register_table(pg, registry, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})
    assert refresh_table("sqp")["analyzed"] is True
    before = last_analyze(pg, registry, "sqp")
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(300, updated=datetime(2026, 2, 1, tzinfo=UTC), price_bump=Decimal(1)))
    with psycopg.connect(pg_uri) as vacuum_like:  # SHARE UPDATE EXCLUSIVE: what VACUUM and CREATE INDEX CONCURRENTLY take
        vacuum_like.execute(sql.SQL("LOCK TABLE {} IN SHARE UPDATE EXCLUSIVE MODE").format(sql.Identifier(registry, "sqp")))
        release = threading.Timer(60, vacuum_like.rollback)  # a safety net only: the run must not wait for it
        release.start()
        started = time.monotonic()
        try:
            run = refresh_table("sqp")
        finally:
            release.cancel()
    assert run["status"] == "success" and run["rows_updated"] == 300
    assert run["analyzed"] is False and "lock timeout" in run["analyze_error"]
    meta = audit_metadata(pg, registry, run["audit_id"])
    assert meta["analyzed"] is False and "lock timeout" in meta["analyze_error"]
    assert time.monotonic() - started < 45, "the run waited for the lock longer than ANALYZE_LOCK_TIMEOUT"
    assert ANALYZE_LOCK_TIMEOUT == "5s"
    assert last_analyze(pg, registry, "sqp") == before
    prices = pg.execute(sql.SQL("SELECT min(median_price) FROM {}").format(sql.Identifier(registry, "sqp"))).fetchone()
    assert prices == (Decimal("20.990000001"),)  # the reload is published
