"""Soak: 30 cycles of random source changes, a refresh after each, and after every cycle an independent
comparator (the BigQuery client's own query against the source, psycopg against the target, value by
value) confirming target == source. Nothing the product computes is trusted here.

Two tables: an incremental one (cursor, 1-day lookback, hard deletes) that gets inserts, updates,
deletes and late rows inside the lookback; a window-mode one (Amazon's restated weeks) that gets new
weeks, whole weeks restated with changed, dropped and added rows.
"""

from __future__ import annotations

import os
import random
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pyarrow as pa
import pytest

from blocks import BigQuerySource
from bq_refresh.settings import Settings
from flows.refresh_table import refresh_table
from tasks.migrations import apply_migrations
from tasks.registry import register_table
from tests.bqdata import assert_same_rows, norm, pg_rows, put_table, source_rows
from tests.test_engine import SQP_KEY, SQP_SCHEMA

CYCLES = int(os.environ.get("BQ_REFRESH_SOAK_CYCLES", "30"))
# Database-facing: runs in both passes of ./dev test (embedded PostgreSQL and PostgreSQL 15). A cycle takes
# about 4 s here; a longer soak gets a longer timeout than the suite's 600 s.
# Once, on the Supabase-like server (PostgreSQL 15 through PgBouncer, TLS: the production-like one): it ran on both
# and was the second longest file of each pass.
pytestmark = [pytest.mark.emulator, pytest.mark.slow, pytest.mark.once, pytest.mark.second, pytest.mark.timeout(max(600, 20 * CYCLES)),
              pytest.mark.usefixtures("prefect_harness")]
Key = tuple[date, str, str]


def to_arrow(rows: dict[Key, dict[str, Any]]) -> pa.Table:
    ordered = [rows[k] for k in sorted(rows)]
    return pa.table({
        "start_date": pa.array([r["start_date"] for r in ordered], pa.date32()),
        "asin": pa.array([r["asin"] for r in ordered], pa.string()),
        "search_query": pa.array([r["search_query"] for r in ordered], pa.string()),
        "impressions": pa.array([r["impressions"] for r in ordered], pa.int64()),
        "click_share": pa.array([r["click_share"] for r in ordered], pa.decimal128(38, 9)),
        "median_price": pa.array([r["median_price"] for r in ordered], pa.decimal128(38, 9)),
        "updated_at": pa.array([r["updated_at"] for r in ordered], pa.timestamp("us", tz="UTC")),
    })


class Model:
    """The source as the test means it to be, and a random generator of realistic changes."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.rows: dict[Key, dict[str, Any]] = {}
        self.serial = 0

    def row(self, start: date, updated: datetime) -> dict[str, Any]:
        self.serial += 1
        return {"start_date": start, "asin": f"B0{self.rng.randrange(40):08d}", "search_query": f"q {self.serial}",
                "impressions": self.rng.randrange(10**6), "click_share": Decimal(self.rng.randrange(10**9)) / 10**9,
                "median_price": Decimal(self.rng.randrange(10**7)) / 100 + Decimal("0.000000001"),
                "updated_at": updated}

    def add(self, start: date, updated: datetime) -> None:
        r = self.row(start, updated)
        self.rows[(r["start_date"], r["asin"], r["search_query"])] = r

    def change(self, key: Key, updated: datetime) -> None:
        r = self.rows[key]
        r["impressions"] = self.rng.randrange(10**6)
        r["median_price"] = Decimal(self.rng.randrange(10**7)) / 100
        r["updated_at"] = updated

    def pick(self, n: int) -> list[Key]:
        keys = sorted(self.rows)
        return self.rng.sample(keys, min(n, len(keys)))


def compare(source: BigQuerySource, pg: psycopg.Connection[Any], schema: str, table: str,
            model: Model, cycle: int) -> None:
    in_source = source_rows(source, table)
    in_target = pg_rows(pg, f'"{schema}".{table}', "1")
    assert len(in_source) == len(model.rows), f"cycle {cycle}: the emulator holds {len(in_source)}, meant {len(model.rows)}"
    try:
        assert_same_rows(in_source, in_target, SQP_KEY)
    except AssertionError as exc:
        raise AssertionError(f"cycle {cycle}, table {table}: {exc}") from None
    for r in in_source[:3]:  # the comparator compares real values, not just keys
        assert any(norm(r["median_price"]) == norm(t["median_price"]) for t in in_target)


def test_thirty_cycles_of_random_changes_end_exact_after_every_cycle(
    env: Settings, pg: psycopg.Connection[Any],
) -> None:
    schema = env.schema_name
    apply_migrations(pg, schema)
    source = BigQuerySource.from_settings(env)
    rng = random.Random(20261123)
    clock = datetime(2025, 3, 2, 2, 0, tzinfo=UTC)
    week0 = date(2025, 3, 2)
    inc, win = Model(rng), Model(rng)
    for _ in range(150):
        inc.add(week0 - timedelta(weeks=rng.randrange(4)), clock - timedelta(hours=rng.randrange(1, 48)))
    for w in range(3):
        for _ in range(40):
            win.add(week0 - timedelta(weeks=w), clock - timedelta(hours=1))
    register_table(pg, schema, "soak_incremental", {"source": "soak_incremental", "key": SQP_KEY, "cursor": "updated_at",
                                                    "lookback": "1d", "delete_policy": {"mode": "hard"}})
    register_table(pg, schema, "soak_window", {"source": "soak_window", "key": SQP_KEY, "cursor": "updated_at",
                                               "lookback": "7d", "mode": "window", "window_column": "start_date"})
    totals = {"inserted": 0, "updated": 0, "deleted": 0, "late": 0, "restated_weeks": 0}
    for cycle in range(CYCLES + 1):
        if cycle:
            clock += timedelta(days=1)
            previous = clock - timedelta(days=1)
            # incremental: inserts, updates (cursor moves), deletes, late rows inside the lookback
            for _ in range(rng.randrange(3, 12)):
                inc.add(week0 + timedelta(weeks=cycle // 7), clock - timedelta(minutes=rng.randrange(60)))
                totals["inserted"] += 1
            for key in inc.pick(rng.randrange(2, 10)):
                inc.change(key, clock)
                totals["updated"] += 1
            for key in inc.pick(rng.randrange(0, 5)):
                del inc.rows[key]
                totals["deleted"] += 1
            for _ in range(rng.randrange(0, 4)):  # arrive late: older than the last watermark, within 1 day
                inc.add(week0, previous - timedelta(hours=rng.randrange(1, 20)))
                totals["late"] += 1
            # window: the current week grows (restated whole), and now and then an older week is restated
            current = week0 + timedelta(weeks=cycle // 3)
            weeks = {current} | ({rng.choice(sorted({k[0] for k in win.rows}))} if rng.random() < 0.5 else set())
            for week in sorted(weeks):  # a set of dates iterates in hash order, which differs per process
                keys = [k for k in win.rows if k[0] == week]
                for key in keys:
                    roll = rng.random()
                    if roll < 0.1:
                        del win.rows[key]
                        totals["deleted"] += 1
                    elif roll < 0.4:
                        win.change(key, clock)
                        totals["updated"] += 1
                    else:
                        win.rows[key]["updated_at"] = clock  # restated unchanged
                for _ in range(rng.randrange(1, 6)):
                    win.add(week, clock)
                    totals["inserted"] += 1
                totals["restated_weeks"] += 1
        put_table(source, "soak_incremental", SQP_SCHEMA, to_arrow(inc.rows))
        put_table(source, "soak_window", SQP_SCHEMA, to_arrow(win.rows))
        for table in ("soak_incremental", "soak_window"):
            result = refresh_table(table)
            assert result["status"] == "success", result
        compare(source, pg, schema, "soak_incremental", inc, cycle)
        compare(source, pg, schema, "soak_window", win, cycle)
    print(f"soak: {CYCLES} cycles, {totals}, final rows {len(inc.rows)} + {len(win.rows)}")  # noqa: T201
    assert totals["late"] > 0 and totals["deleted"] > 0 and totals["restated_weeks"] > CYCLES
    audit = pg.execute(f'SELECT status, count(*) FROM "{schema}".refresh_audit_log GROUP BY 1').fetchall()
    assert dict(audit) == {"success": 2 * (CYCLES + 1)}
