"""A refresh killed with SIGKILL during the load resumes from its checkpoint and ends exact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import psycopg
import pytest

import tests.killable_refresh  # noqa: F401  (registers the slow transform here too)
from blocks import BigQuerySource
from bq_refresh.settings import Settings
from flows.refresh_table import refresh_table
from tasks.migrations import apply_migrations
from tasks.registry import register_table
from tests.bqdata import assert_same_rows, pg_rows, put_table, source_rows
from tests.conftest import ROOT, OwnEmulator
from tests.test_engine import SQP_KEY, SQP_SCHEMA, sqp_rows

pytestmark = [pytest.mark.emulator, pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def kill_mid_load(pg: psycopg.Connection[Any], schema: str, *, at_rows: int) -> None:
    """Start the refresh of "sqp" in a child process and SIGKILL it once ``at_rows`` rows are staged."""
    from prefect.settings import PREFECT_API_URL

    child_env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-m", "tests.killable_refresh", "sqp"], cwd=ROOT, env=child_env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        row = pg.execute(f'SELECT last_processed_row FROM "{schema}".refresh_checkpoints WHERE status = %s',
                         ("active",)).fetchone()
        if row and row[0] and row[0] >= at_rows:
            break
        time.sleep(0.05)
    assert child.poll() is None, f"the child ended before it could be killed: {child.stderr.read() if child.stderr else ''}"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()


def staged_sqp(env: Settings, pg: psycopg.Connection[Any], total: int) -> BigQuerySource:
    """``total`` SQP rows in BigQuery and table "sqp" registered on the staged, checkpointed path (slow batches)."""
    apply_migrations(pg, env.schema_name)
    source = BigQuerySource.from_settings(env)
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(total))
    register_table(pg, env.schema_name, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at",
                                                "batch_size": 250, "transform": "slow_for_tests",
                                                "direct_initial_load": False})
    return source


def test_sigkill_during_load_then_rerun_resumes(env: Settings, pg: psycopg.Connection[Any]) -> None:
    schema, total = env.schema_name, 6000
    source = staged_sqp(env, pg, total)

    kill_mid_load(pg, schema, at_rows=1000)

    # Killed mid-load: nothing published, the checkpoint and staged batches survive.
    assert pg.execute(f'SELECT count(*) FROM "{schema}".sqp').fetchone() == (0,)
    ckpt = pg.execute(f'SELECT last_processed_row FROM "{schema}".refresh_checkpoints WHERE status = %s',
                      ("active",)).fetchone()
    assert ckpt is not None and ckpt[0] >= 1000 and ckpt[0] % 250 == 0

    rerun = refresh_table("sqp")
    assert rerun["resumed"] is True
    assert rerun["resumed_from_rows"] == ckpt[0]
    assert rerun["rows_read"] == total - ckpt[0]  # continued, did not start over
    assert rerun["rows_inserted"] == total
    assert_same_rows(source_rows(source, "sqp"), pg_rows(pg, f'"{schema}".sqp', "1"), SQP_KEY)
    dupes = pg.execute(f'SELECT count(*) - count(DISTINCT (start_date, asin, search_query)) FROM "{schema}".sqp').fetchone()
    assert dupes == (0,)
    audit = pg.execute(f'SELECT status FROM "{schema}".refresh_audit_log ORDER BY id').fetchall()
    assert audit[-1] == ("success",)


def test_an_expired_read_session_is_recreated_and_the_run_completes(
    env: Settings, pg: psycopg.Connection[Any], own_emulator: OwnEmulator,
) -> None:
    """Kill mid-load, restart the emulator (its read sessions die with it), rerun: a new session at the
    same snapshot is opened, staging restarts, and the table ends exact."""
    source = own_emulator.source
    schema = env.schema_name
    apply_migrations(pg, schema)
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(4000))
    register_table(pg, schema, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at",
                                       "batch_size": 250, "transform": "slow_for_tests",
                                       "direct_initial_load": False})  # the staged, checkpointed path
    kill_mid_load(pg, schema, at_rows=500)
    own_emulator.stop()
    own_emulator.start()

    rerun = refresh_table("sqp")
    assert rerun["resumed"] is True and rerun["session_recreated"] == 1
    assert rerun["rows_inserted"] == 4000 and rerun["duplicate_keys"] == 0
    assert_same_rows(source_rows(source, "sqp"), pg_rows(pg, f'"{schema}".sqp', "1"), SQP_KEY)


@pytest.mark.once
def test_a_checkpoint_whose_row_restriction_is_sql_text_is_not_resumed(env: Settings, pg: psycopg.Connection[Any]) -> None:
    """A checkpoint keeps its row restriction as data (tasks/restriction.py), never SQL text: one written as text (by
    an earlier version, or edited in the database) is not read back into a query or a read session; the run starts
    over, says why, and ends exact."""
    schema, total = env.schema_name, 3000
    source = staged_sqp(env, pg, total)
    kill_mid_load(pg, schema, at_rows=500)
    pg.execute(f"UPDATE \"{schema}\".refresh_checkpoints SET checkpoint_data = jsonb_set(checkpoint_data #- "
               "'{session,restriction}', '{session,row_restriction}', to_jsonb('TRUE) OR (TRUE'::text))"
               " WHERE status = 'active'")
    rerun = refresh_table("sqp")
    assert rerun["resumed"] is False and rerun["rows_read"] == total, rerun
    restarted = pg.execute(f"SELECT sync_metadata->>'restarted' FROM \"{schema}\".refresh_audit_log ORDER BY id DESC"
                           " LIMIT 1").fetchone()
    assert restarted is not None and "row restriction as SQL text" in restarted[0], restarted
    assert_same_rows(source_rows(source, "sqp"), pg_rows(pg, f'"{schema}".sqp', "1"), SQP_KEY)
