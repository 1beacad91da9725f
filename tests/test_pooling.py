"""Transaction pooling is refused before anything is touched (tasks/preflight.py).

Through PgBouncer in transaction mode (Supavisor's transaction pooler, Supabase's port 6543) advisory locks,
session settings and temporary tables do not survive from one transaction to the next. A lone client usually gets
the same server connection back, so the probe holds a second client in a transaction while it asks the first
for a setting it made: tested with ``default_pool_size=1``, a larger pool, and a competing client running
transactions all along. The direct connection and the session pooler pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from bq_refresh.settings import Settings
from tasks.migrations import apply_migrations
from tasks.preflight import probe_session_state
from tasks.registry import register_table
from tests.conftest import ROOT
from tests.test_engine import SQP_KEY


def test_a_direct_connection_keeps_its_session(pg_uri: str) -> None:
    assert probe_session_state(pg_uri).problem is None


@pytest.fixture(scope="module")
def transaction_pooler(supabase_like: Any) -> Iterator[Any]:
    """A second PgBouncer in front of the same server, in transaction mode, with one server connection."""
    bouncer = supabase_like.pgbouncer("transaction-1", pool_mode="transaction", default_pool_size=1)
    port = bouncer.start()
    yield supabase_like.uri(port=port)
    bouncer.stop()


def test_the_session_pooler_keeps_the_session(supabase_like: Any) -> None:
    assert [probe_session_state(supabase_like.uri()).problem for _ in range(5)] == [None] * 5


def test_a_transaction_pooler_with_one_server_connection_is_seen(transaction_pooler: str) -> None:
    probe = probe_session_state(transaction_pooler)
    assert probe.problem is not None and "transaction" in probe.problem


@pytest.mark.parametrize("pool_size", [1, 5])
def test_a_transaction_pooler_is_seen_while_a_competing_client_runs_transactions(supabase_like: Any,
                                                                                pool_size: int) -> None:
    bouncer = supabase_like.pgbouncer(f"transaction-busy-{pool_size}", pool_mode="transaction",
                                      default_pool_size=pool_size)
    uri = supabase_like.uri(port=bouncer.start())
    stop = threading.Event()

    def compete() -> None:  # another worker's short transactions, all along (no prepared statements: pooled)
        with psycopg.connect(uri, autocommit=True, prepare_threshold=None) as other:
            while not stop.is_set():
                other.execute("SELECT pg_sleep(0.01)")

    competitor = threading.Thread(target=compete, daemon=True)
    competitor.start()
    try:
        seen = [probe_session_state(uri).problem for _ in range(10)]
    finally:
        stop.set()
        competitor.join(10)
        bouncer.stop()
    assert all(problem is not None for problem in seen), seen


@pytest.mark.emulator
def test_a_run_through_the_transaction_pooler_stops_before_touching_data_with_one_line(
    env: Settings, pg: psycopg.Connection[Any], transaction_pooler: str,
) -> None:
    s = env.schema_name
    apply_migrations(pg, s)
    register_table(pg, s, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})
    before = pg.execute(f'SELECT count(*) FROM "{s}".refresh_audit_log').fetchone()
    run = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--force"], cwd=ROOT, capture_output=True,
                         text=True, timeout=240, env={**os.environ, "BQ_REFRESH_DATABASE_URL": transaction_pooler,
                                                      "PREFECT_HOME": os.environ.get("PREFECT_HOME", "")})
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if "transaction pooler" in line]
    assert len(lines) == 1 and "session pooler" in lines[0] and "pool_mode = session" in lines[0], run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    assert pg.execute("SELECT to_regclass(%s)", (f'"{s}".sqp',)).fetchone() == (None,)  # no target created
    assert pg.execute(f'SELECT count(*) FROM "{s}".refresh_audit_log').fetchone() == before
    assert pg.execute(f'SELECT count(*) FROM "{s}".refresh_checkpoints').fetchone() == (0,)
    # bq-refresh doctor says the same, as its session line (the probe is shared).
    doctor = subprocess.run([sys.executable, "-m", "flows.cli", "doctor"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "BQ_REFRESH_DATABASE_URL": transaction_pooler})
    assert doctor.returncode == 1, doctor.stderr[-2000:]
    assert any(line.startswith("FAIL    session: BQ_REFRESH_DATABASE_URL goes through a transaction pooler")
               for line in doctor.stdout.splitlines()), doctor.stdout
