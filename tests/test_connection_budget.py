"""A connection budget (REFRESH_MAX_CONNECTIONS): a night's run never holds more PostgreSQL sessions than a small
Supabase pooler gives. Each table's run holds 3 sessions + 1 per read stream at its peak; tables start only while
their sessions fit, and a table's streams are capped to fit alone. Measured through PgBouncer (its admin console's
SHOW CLIENTS, sampled all along the run) in front of the Supabase-like PostgreSQL 15."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import psycopg
import pyarrow as pa
import pytest
from psycopg import pq

import tests.killable_refresh  # noqa: F401  (registers the slow transform)
from blocks import BigQuerySource
from bq_refresh.settings import Settings
from flows.daily_refresh import daily_refresh
from tasks.migrations import apply_migrations
from tasks.planning import admits, streams_within, table_sessions
from tasks.registry import register_table
from tests.bqdata import assert_same_rows, pg_rows, put_table, source_rows
from tests.supabase_like import PgBouncer
from tests.test_engine import SQP_KEY, SQP_SCHEMA, sqp_rows


def test_the_budget_arithmetic() -> None:
    assert table_sessions(1) == 4 and table_sessions(4) == 7
    assert streams_within(4, None) == 4 and streams_within(4, 6) == 2 and streams_within(4, 5) == 1
    assert admits([], 99, 5)  # a table always fits alone (its streams capped)
    assert admits([4], 4, 9) and not admits([4, 4], 4, 9) and not admits([4], 5, 9)
    assert admits([7, 7, 7], 7, None)


class ClientCounter:
    """Samples PgBouncer's SHOW CLIENTS (admin console, simple protocol) every 20 ms; keeps the peak."""

    def __init__(self, admin_uri: str) -> None:
        self.conn = pq.PGconn.connect(admin_uri.encode())
        assert self.conn.status == pq.ConnStatus.OK, self.conn.error_message
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def count(self) -> int:
        res = self.conn.exec_(b"SHOW CLIENTS")
        assert res.status == pq.ExecStatus.TUPLES_OK, res.error_message
        database = next(i for i in range(res.nfields) if res.fname(i) == b"database")
        return sum(1 for r in range(res.ntuples) if res.get_value(r, database) != b"pgbouncer")

    def _run(self) -> None:
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, self.count())

    def __enter__(self) -> ClientCounter:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        self.conn.finish()


@dataclass
class QuickQueue(PgBouncer):
    """PgBouncer with a short query_wait_timeout: a client left waiting for a server connection fails in 10 s (the
    default, 120 s, is what a night without a budget would wait before failing)."""

    query_wait_timeout_s: int = 10

    def config(self) -> str:
        return super().config() + f"query_wait_timeout = {self.query_wait_timeout_s}\n"


@pytest.fixture(scope="module")
def small_pooler(supabase_like: Any) -> Iterator[tuple[str, str]]:
    """A session-mode PgBouncer with 9 server connections: the refresh's URI and the admin console's."""
    from tests.supabase_like import uri

    made = supabase_like.pgbouncer("small", pool_mode="session", default_pool_size=9)
    bouncer = QuickQueue(**{f.name: getattr(made, f.name) for f in fields(made)})
    port = bouncer.start()
    yield supabase_like.uri(port=port), uri(port, user="postgres", password=supabase_like.password,
                                            database="pgbouncer")
    bouncer.stop()


def tables(pg: psycopg.Connection[Any], source: BigQuerySource, schema: str, n: int) -> None:
    apply_migrations(pg, schema)
    for i in range(n):
        put_table(source, f"src_{i}", SQP_SCHEMA, pa.Table.from_pylist(sqp_rows(4000).to_pylist()))
        register_table(pg, schema, f"t_{i}", {"source": f"src_{i}", "key": SQP_KEY, "cursor": "updated_at",
                                              "streams": 1, "batch_size": 200,
                                              "transform": "slow_for_tests"})  # 0.15 s a batch: runs overlap


@pytest.mark.emulator
@pytest.mark.usefixtures("prefect_harness")
def test_a_night_holds_no_more_sessions_than_the_budget_through_a_small_pooler(
    env: Settings, pg: psycopg.Connection[Any], source: BigQuerySource, small_pooler: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refresh_uri, admin_uri = small_pooler
    tables(pg, source, env.schema_name, 4)
    monkeypatch.setenv("BQ_REFRESH_DATABASE_URL", refresh_uri)
    # With REFRESH_MAX_CONNECTIONS=9: never more than 9 sessions (two tables at a time), every table exact. (A
    # night without the budget holds more and fails with query_wait_timeout when its tables overlap enough; how
    # much they overlap depends on the machine's load, so that is shown by hand, not asserted.)
    monkeypatch.setenv("REFRESH_MAX_CONNECTIONS", "9")
    with ClientCounter(admin_uri) as clients:
        state = daily_refresh(max_concurrency=4, return_state=True)
    assert state.is_completed(), state.message
    assert 0 < clients.peak <= 9, clients.peak
    for i in range(4):
        assert_same_rows(source_rows(source, f"src_{i}"), pg_rows(pg, f'"{env.schema_name}".t_{i}', "1, 2, 3"),
                         SQP_KEY)
