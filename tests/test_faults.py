"""Fault injection with real processes: after every fault the live table is the source or its previous
state (never between), no key is doubled, the audit log says what happened, and the next run finishes.

Faults: BigQuery down / answering 500 or 503 / slower than the deadline (a real HTTP proxy in front of
the emulator's REST API), the Storage Read stream cut mid-read or refused (a real TCP proxy in front of the
emulator's gRPC port), the emulator stopped mid-read, SIGKILL of the refresh during the publish, PostgreSQL
restarted mid-run, a statement timeout in PostgreSQL. (SIGKILL during the COPY and an expired read
session: tests/test_resume.py; the webhook endpoint down: tests/test_orchestration.py; two runs of one
table at once: tests/test_engine.py.)
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

import tests.killable_refresh  # noqa: F401  (registers the slow transform here too)
from blocks import BigQuerySource
from bq_refresh.services import free_port
from bq_refresh.settings import Settings
from flows.refresh_table import refresh_table
from tasks.migrations import apply_migrations
from tasks.registry import register_table
from tests.bqdata import assert_same_rows, create_sqp_target, pg_rows, put_table, source_rows
from tests.conftest import ROOT, OwnEmulator, WebhookReceiver
from tests.faultproxy import FaultProxy, TcpFaultProxy
from tests.test_engine import SQP_KEY, SQP_SCHEMA, T0, sqp_rows

pytestmark = [pytest.mark.emulator, pytest.mark.usefixtures("prefect_harness")]


@pytest.fixture
def proxy(env: Settings) -> Iterator[FaultProxy]:
    assert env.bigquery_api_endpoint is not None
    p = FaultProxy(env.bigquery_api_endpoint)
    yield p
    p.close()


@pytest.fixture
def grpc_proxy(env: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[TcpFaultProxy]:
    """A TCP proxy in front of the emulator's Storage Read gRPC port; the test's environment reads through it."""
    assert env.bigquery_storage_endpoint is not None
    p = TcpFaultProxy(env.bigquery_storage_endpoint)
    monkeypatch.setenv("BIGQUERY_STORAGE_ENDPOINT", p.target)
    yield p
    p.close()


def live(pg: psycopg.Connection[Any], schema: str, table: str = "sqp") -> list[dict[str, Any]]:
    return pg_rows(pg, f'"{schema}"."{table}"', "start_date, asin, search_query")


def no_duplicate_keys(pg: psycopg.Connection[Any], schema: str, table: str = "sqp") -> None:
    row = pg.execute(f'SELECT count(*) - count(DISTINCT (start_date, asin, search_query)) FROM "{schema}"."{table}"').fetchone()
    assert row == (0,)


def audit_rows(pg: psycopg.Connection[Any], schema: str) -> list[tuple[Any, ...]]:
    return pg.execute(f'SELECT id, status, error_message FROM "{schema}".refresh_audit_log ORDER BY id').fetchall()


def loaded_then_changed(env: Settings, pg: psycopg.Connection[Any], *, n: int = 400, **spec: Any) -> tuple[BigQuerySource, list[dict[str, Any]]]:
    """Load ``n`` rows, then change the source (updates and inserts); return the source and the live snapshot."""
    schema = env.schema_name
    apply_migrations(pg, schema)
    source = BigQuerySource.from_settings(env)
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(n))
    register_table(pg, schema, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at", **spec})
    assert refresh_table("sqp")["status"] == "success"
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(n + n // 4, updated=T0 + timedelta(days=1), price_bump=Decimal(1)))
    return source, live(pg, schema)


def faulty_settings(monkeypatch: pytest.MonkeyPatch, webhook: WebhookReceiver) -> None:
    monkeypatch.setenv("REFRESH_RETRIES", "1")
    monkeypatch.setenv("REFRESH_RETRY_DELAY_SECONDS", "0.1")
    monkeypatch.setenv("REFRESH_WEBHOOK_URL", webhook.url)


def assert_failed_cleanly(pg: psycopg.Connection[Any], schema: str, before: list[dict[str, Any]],
                          webhook: WebhookReceiver, *words: str) -> None:
    """Live table untouched, no doubled key, the audit row and the alert name the table and the fault."""
    assert live(pg, schema) == before
    no_duplicate_keys(pg, schema)
    last = audit_rows(pg, schema)[-1]
    assert last[1] == "failed" and f"{schema}.sqp" in last[2], last
    for word in words:
        assert word.lower() in last[2].lower(), last
    alerts = [json.loads(r["body"]) for r in webhook.received]
    assert any(a["event"] == "table_failed" and a["table"] == f"{schema}.sqp" and a["error"] for a in alerts), alerts


@pytest.mark.once  # BigQuery-side faults: the PostgreSQL side is the same SQL on every server version
@pytest.mark.parametrize("fault", ["down", "http500", "http503", "slow"])
def test_bigquery_faults_leave_the_table_as_it_was_and_the_next_run_completes(
    fault: str, env: Settings, pg: psycopg.Connection[Any], proxy: FaultProxy, webhook: WebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    schema = env.schema_name
    source, before = loaded_then_changed(env, pg)
    faulty_settings(monkeypatch, webhook)
    monkeypatch.setenv("BIGQUERY_TIMEOUT_SECONDS", "2")
    if fault == "down":  # nothing listens on either port
        monkeypatch.setenv("BIGQUERY_API_ENDPOINT", f"http://127.0.0.1:{free_port()}")
        monkeypatch.setenv("BIGQUERY_STORAGE_ENDPOINT", f"127.0.0.1:{free_port()}")
    else:
        monkeypatch.setenv("BIGQUERY_API_ENDPOINT", proxy.url)
        if fault == "slow":
            proxy.delay_s = 4.0
        else:
            proxy.fail_status, proxy.fail_next = (500 if fault == "http500" else 503), -1

    started = time.monotonic()
    with pytest.raises(Exception) as failure:
        refresh_table("sqp")
    assert f"{schema}.sqp" in str(failure.value) and "BigQuery" in str(failure.value), failure.value
    assert time.monotonic() - started < 60  # bounded by our deadlines, not the client's 10-minute default
    assert_failed_cleanly(pg, schema, before, webhook, "BigQuery")
    if fault in ("http500", "http503"):
        assert len(proxy.requests) >= 2  # the client retried within the budget before giving up
    elif fault == "slow":  # no answer within BIGQUERY_TIMEOUT_SECONDS: the one budget is spent, no task retry
        assert len(proxy.requests) == 1, proxy.requests

    proxy.heal()
    monkeypatch.setenv("BIGQUERY_API_ENDPOINT", str(env.bigquery_api_endpoint))
    monkeypatch.setenv("BIGQUERY_STORAGE_ENDPOINT", str(env.bigquery_storage_endpoint))
    assert refresh_table("sqp")["status"] == "success"
    assert_same_rows(source_rows(source, "sqp"), live(pg, schema), SQP_KEY)
    no_duplicate_keys(pg, schema)


@pytest.mark.once
def test_a_flaky_bigquery_is_retried_within_the_run(
    env: Settings, pg: psycopg.Connection[Any], proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch,
) -> None:
    schema = env.schema_name
    source, _ = loaded_then_changed(env, pg)
    monkeypatch.setenv("BIGQUERY_API_ENDPOINT", proxy.url)
    proxy.fail_status, proxy.fail_next = 503, 2
    result = refresh_table("sqp")
    assert result["status"] == "success" and proxy.fail_next == 0
    assert_same_rows(source_rows(source, "sqp"), live(pg, schema), SQP_KEY)


# The emulator answers a Storage Read stream in one or a few large gRPC messages (up to 65,536 rows each):
# 10,000 changed rows are ~800 KB, so a cut after 8 KB lands inside the first message, mid-read.
CUT_AFTER_BYTES = 8192


@pytest.mark.once  # BigQuery-side fault
def test_a_storage_read_stream_cut_once_mid_read_is_resumed_by_the_client_and_ends_exact(
    env: Settings, pg: psycopg.Connection[Any], grpc_proxy: TcpFaultProxy,
) -> None:
    """The Google client's ReadRowsStream reconnects a stream reset by the network (UNAVAILABLE) by itself,
    at the offset of the rows it has received: the run succeeds, reading each row once."""
    schema = env.schema_name
    source, _ = loaded_then_changed(env, pg, n=8000)
    grpc_proxy.cut_after_bytes, grpc_proxy.cuts = CUT_AFTER_BYTES, 1

    result = refresh_table("sqp")
    assert grpc_proxy.cut_connections == 1, grpc_proxy.bytes_to_client
    assert max(grpc_proxy.bytes_to_client) > 50 * CUT_AFTER_BYTES  # the stream went on after the cut point
    assert result["status"] == "success" and result["rows_read"] == 10_000 and result["duplicate_keys"] == 0, result
    assert_same_rows(source_rows(source, "sqp"), live(pg, schema), SQP_KEY)
    no_duplicate_keys(pg, schema)
    assert [a[1] for a in audit_rows(pg, schema)] == ["success", "success"]


@pytest.mark.once  # BigQuery-side faults
@pytest.mark.slow
@pytest.mark.parametrize("fault", ["cut_every_connection", "cut_every_connection_long_deadline", "refused"])
def test_a_storage_read_stream_that_stays_broken_fails_the_table_cleanly_and_the_next_run_completes(
    fault: str, env: Settings, pg: psycopg.Connection[Any], grpc_proxy: TcpFaultProxy, webhook: WebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """cut_every_connection: every connection is reset 8 KB into the stream. The Google client reconnects
    without end (it resumes UNAVAILABLE streams with no limit of its own, each reconnect under a retry with a
    day's deadline); our read bounds each reconnect's retry, and the time without a message, by
    BIGQUERY_TIMEOUT_SECONDS (3 s here): the table fails naming the last error, and stops reconnecting.
    ..._long_deadline: the same with a 60 s deadline, so the table's time limit (20 s) ends it first, and the
    audit row names the table and REFRESH_TABLE_TIMEOUT_SECONDS.
    refused: the Storage Read port resets every connection; opening the read session fails within our deadline."""
    from flows.daily_refresh import daily_refresh, night_summary

    schema = env.schema_name
    source, before = loaded_then_changed(env, pg, n=8000)
    faulty_settings(monkeypatch, webhook)
    monkeypatch.setenv("BIGQUERY_TIMEOUT_SECONDS", "60" if fault.endswith("long_deadline") else "3")
    monkeypatch.setenv("REFRESH_TABLE_TIMEOUT_SECONDS", "20")
    if fault.startswith("cut_every_connection"):
        grpc_proxy.cut_after_bytes, grpc_proxy.cuts = CUT_AFTER_BYTES, -1
    else:
        grpc_proxy.refuse = True

    started = time.monotonic()
    summary = night_summary(daily_refresh(tables=["sqp"], return_state=True))
    assert time.monotonic() - started < 90
    assert summary["failed"] == [f"{schema}.sqp"], summary
    error = summary["tables"][0]["error"]
    if fault.startswith("cut_every_connection"):
        # the short deadline bounds each reconnect's retry (or, for a stream that hangs, the watchdog's stall)
        said = "timed out" if fault.endswith("long_deadline") else "Storage Read API failed mid-read: gave up retrying"
        assert said in error, error
        assert grpc_proxy.cut_connections >= 2, grpc_proxy.bytes_to_client  # the client kept reconnecting
        connections = grpc_proxy.connections
        time.sleep(3)
        assert grpc_proxy.connections == connections  # the timed-out read no longer reconnects
        assert live(pg, schema) == before
        no_duplicate_keys(pg, schema)
        timed_out = audit_rows(pg, schema)[-1]
        assert timed_out[1] == "failed", timed_out
        alerts = [json.loads(r["body"]) for r in webhook.received]
        assert any(a["event"] == "table_failed" and a["table"] == f"{schema}.sqp" and said in a["error"]
                   for a in alerts), alerts
    else:
        assert f"{schema}.sqp" in error and "Storage Read API unavailable" in error and grpc_proxy.refused >= 1, error
        assert_failed_cleanly(pg, schema, before, webhook, "Storage Read API unavailable")

    grpc_proxy.heal()
    monkeypatch.setenv("REFRESH_TABLE_TIMEOUT_SECONDS", "600")
    # gRPC waits out its reconnect backoff (seconds after many refused connections): a normal deadline again
    monkeypatch.setenv("BIGQUERY_TIMEOUT_SECONDS", "30")
    rerun = refresh_table("sqp")
    assert rerun["status"] == "success", rerun
    assert_same_rows(source_rows(source, "sqp"), live(pg, schema), SQP_KEY)
    no_duplicate_keys(pg, schema)
    assert audit_rows(pg, schema)[-1][1] == "success"
    if fault.endswith("long_deadline"):  # ended by its time limit: the audit row names the table and the limit
        assert f"{schema}.sqp" in (timed_out[2] or "") and "REFRESH_TABLE_TIMEOUT_SECONDS" in (timed_out[2] or ""), timed_out


# --- faults that need the refresh in its own process -------------------------------------------------

def start_child(extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    from prefect.settings import PREFECT_API_URL

    child_env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PYTHONPATH": str(ROOT),
                 **(extra_env or {})}
    return subprocess.Popen([sys.executable, "-m", "tests.killable_refresh", "sqp"], cwd=ROOT, env=child_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_until(predicate: Any, child: subprocess.Popen[bytes], what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if child.poll() is not None:
            err = child.stderr.read().decode()[-3000:] if child.stderr else ""
            raise AssertionError(f"the child ended (rc {child.returncode}) before {what}: {err}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def staged_rows(pg: psycopg.Connection[Any], schema: str) -> int:
    row = pg.execute(f'SELECT last_processed_row FROM "{schema}".refresh_checkpoints WHERE status = %s',
                     ("active",)).fetchone()
    return int(row[0] or 0) if row else 0


def test_sigkill_during_the_publish_leaves_the_previous_state_and_the_rerun_publishes(
    env: Settings, pg: psycopg.Connection[Any], pg_uri: str,
) -> None:
    schema = env.schema_name
    source, before = loaded_then_changed(env, pg, n=2000)
    # Readers are welcome, writers wait: the run stages and checks, then its publish blocks on this lock
    # inside its transaction, and is killed there.
    blocker = psycopg.connect(pg_uri)
    blocker.execute(f'LOCK TABLE "{schema}".sqp IN SHARE MODE')
    child = start_child()
    waiting: list[str] = []

    def publish_waits() -> bool:
        rows = pg.execute("SELECT query FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND application_name = 'bq-refresh'"
                          " AND query ILIKE %s", (f"%{schema}%",)).fetchall()
        waiting[:] = [r[0] for r in rows]
        return bool(rows)

    try:
        wait_until(publish_waits, child, "the publish to wait for the lock")
        assert "INSERT INTO" in waiting[0] and "sqp" in waiting[0], waiting  # the merge into the live table
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        blocker.rollback()
        blocker.close()
    # The killed backend finds its client gone and rolls back; wait for it to leave.
    deadline = time.monotonic() + 30
    while pg.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'bq-refresh'").fetchone() != (0,):
        assert time.monotonic() < deadline, "the killed run's sessions did not end"
        time.sleep(0.1)
    assert live(pg, schema) == before
    no_duplicate_keys(pg, schema)
    assert audit_rows(pg, schema)[-1][1] == "running"  # what a SIGKILL leaves behind

    rerun = refresh_table("sqp")
    assert rerun["status"] == "success" and rerun["resumed"] is True and rerun["rows_read"] == 0
    assert rerun["interrupted_runs_closed"] == 1
    assert_same_rows(source_rows(source, "sqp"), live(pg, schema), SQP_KEY)
    no_duplicate_keys(pg, schema)
    audit = audit_rows(pg, schema)
    assert audit[-2][1] == "failed" and "interrupted" in audit[-2][2] and audit[-1][1] == "success"


def restart_postgres(pg_uri: str) -> float:
    """Restart the server behind ``pg_uri`` in place (same port and data) with pg_ctl; return seconds."""
    with psycopg.connect(pg_uri, autocommit=True) as conn:
        row = conn.execute("SHOW data_directory").fetchone()
    assert row is not None
    data_dir = str(row[0])
    pid = int(Path(data_dir, "postmaster.pid").read_text().split()[0])
    pg_ctl = Path(os.readlink(f"/proc/{pid}/exe")).parent / "pg_ctl"
    owner = pwd.getpwuid(os.stat(data_dir).st_uid).pw_name
    cmd = [str(pg_ctl), "restart", "-D", data_dir, "-m", "fast", "-w", "-t", "60", "-l", f"{data_dir}/restart.log"]
    if os.getuid() == 0 and owner != "root":
        cmd = ["runuser", "-u", owner, "--", *cmd]
    started = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True, timeout=90)
    return time.monotonic() - started


@pytest.mark.slow
def test_postgres_restarted_mid_run_the_run_resumes_and_ends_exact(
    env: Settings, pg: psycopg.Connection[Any], pg_uri: str,
) -> None:
    schema = env.schema_name
    apply_migrations(pg, schema)
    source = BigQuerySource.from_settings(env)
    total = 5000
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(total))
    register_table(pg, schema, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at",
                                       "batch_size": 250, "transform": "slow_for_tests",
                                       "direct_initial_load": False})  # the staged, checkpointed path
    child = start_child({"REFRESH_RETRIES": "4", "REFRESH_RETRY_DELAY_SECONDS": "1"})
    wait_until(lambda: staged_rows(pg, schema) >= 1000, child, "1000 rows staged")
    pg.close()
    restart_postgres(pg_uri)
    rc = child.wait(timeout=300)
    err = child.stderr.read().decode()[-3000:] if child.stderr else ""
    with psycopg.connect(pg_uri, autocommit=True) as conn:
        audit = audit_rows(conn, schema)
        assert rc == 0, err
        # The same run lost its connections, retried its stage task, resumed from the checkpoint,
        # took its lock again and published.
        assert [a[1] for a in audit] == ["success"], audit
        meta = conn.execute(f'SELECT sync_metadata FROM "{schema}".refresh_audit_log').fetchone()
        assert meta is not None and meta[0]["lock_reacquired"] == 1 and meta[0]["resumed_from_rows"] == 0
        assert_same_rows(source_rows(source, "sqp"), live(conn, schema), SQP_KEY)
        no_duplicate_keys(conn, schema)


def with_options(uri: str, options: str) -> str:
    from urllib.parse import quote

    return uri + ("&" if "?" in uri else "?") + "options=" + quote(options)


def short_statement_timeout(pg_uri: str, monkeypatch: pytest.MonkeyPatch, ms: int) -> None:
    """Give every session of the refresh a statement_timeout of ``ms``: in the URI's options, or, through a pooler
    that refuses startup options (PgBouncer, as in the Supabase-like pass), by REFRESH_STATEMENT_TIMEOUT_SECONDS."""
    uri = with_options(pg_uri, f"-c statement_timeout={ms}")
    try:
        psycopg.connect(uri).close()
    except psycopg.OperationalError as exc:
        if "unsupported startup parameter" not in str(exc):
            raise
        monkeypatch.setenv("REFRESH_STATEMENT_TIMEOUT_SECONDS", str(ms / 1000))
        return
    monkeypatch.setenv("BQ_REFRESH_DATABASE_URL", uri)


def test_a_statement_timeout_fails_the_publish_cleanly_and_the_next_run_publishes(
    env: Settings, pg: psycopg.Connection[Any], pg_uri: str, webhook: WebhookReceiver, monkeypatch: pytest.MonkeyPatch,
) -> None:
    schema = env.schema_name
    source, before = loaded_then_changed(env, pg)
    faulty_settings(monkeypatch, webhook)
    short_statement_timeout(pg_uri, monkeypatch, 1500)
    blocker = psycopg.connect(pg_uri)
    blocker.execute(f'LOCK TABLE "{schema}".sqp IN SHARE MODE')  # the merge waits past the timeout
    try:
        with pytest.raises(Exception) as failure:
            refresh_table("sqp")
    finally:
        blocker.rollback()
        blocker.close()
    assert f"{schema}.sqp" in str(failure.value) and "statement timeout" in str(failure.value), failure.value
    assert_failed_cleanly(pg, schema, before, webhook, "statement timeout")

    monkeypatch.setenv("BQ_REFRESH_DATABASE_URL", pg_uri)
    monkeypatch.delenv("REFRESH_STATEMENT_TIMEOUT_SECONDS", raising=False)
    rerun = refresh_table("sqp")
    assert rerun["status"] == "success" and rerun["resumed"] is True  # the staged rows were kept
    assert_same_rows(source_rows(source, "sqp"), live(pg, schema), SQP_KEY)
    no_duplicate_keys(pg, schema)


@pytest.mark.slow
def test_the_emulator_stopping_mid_read_fails_the_run_cleanly_and_the_next_run_resumes(
    env: Settings, pg: psycopg.Connection[Any], own_emulator: OwnEmulator, webhook: WebhookReceiver,
) -> None:
    source = own_emulator.source
    schema = env.schema_name
    apply_migrations(pg, schema)
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(4000))
    register_table(pg, schema, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at",
                                       "batch_size": 250, "transform": "slow_for_tests",
                                       "direct_initial_load": False})  # the staged, checkpointed path
    child = start_child({"REFRESH_RETRIES": "1", "REFRESH_RETRY_DELAY_SECONDS": "0.2",
                         "BIGQUERY_TIMEOUT_SECONDS": "3", "REFRESH_WEBHOOK_URL": webhook.url})
    wait_until(lambda: staged_rows(pg, schema) >= 500, child, "500 rows staged")
    os.kill(own_emulator.endpoints.pid, signal.SIGKILL)  # the emulator dies mid-read, its read sessions with it
    own_emulator.stop()
    assert child.wait(timeout=120) != 0
    assert pg.execute(f'SELECT count(*) FROM "{schema}".sqp').fetchone() == (0,)
    last = audit_rows(pg, schema)[-1]
    assert last[1] == "failed" and f"{schema}.sqp" in last[2], last
    assert "table_failed" in webhook.events()
    kept = staged_rows(pg, schema)
    assert kept >= 500

    own_emulator.start()
    rerun = refresh_table("sqp")
    assert rerun["status"] == "success" and rerun["resumed"] is True, rerun
    # Either the client had not received every row when the emulator died (the session died with it:
    # a new one at the same snapshot, staging restarted; tests/test_resume.py forces this path), or it
    # had (the emulator answers a stream in one go, so here it usually has: the run failed at its count
    # check against the source, and the rerun publishes the staged rows): both end exact.
    assert rerun["session_recreated"] == 1 or rerun["rows_read"] == 0, rerun
    assert rerun["rows_inserted"] == 4000 and rerun["duplicate_keys"] == 0
    assert_same_rows(source_rows(source, "sqp"), live(pg, schema), SQP_KEY)
    assert audit_rows(pg, schema)[-1][1] == "success"


def test_sigkill_during_a_direct_initial_load_leaves_the_table_empty_with_its_indexes(
    env: Settings, pg: psycopg.Connection[Any],
) -> None:
    """The direct path is one transaction: killed inside its COPY, the table is as it was (empty, key and
    index in place), and the rerun loads everything."""
    schema = env.schema_name
    apply_migrations(pg, schema)
    source = BigQuerySource.from_settings(env)
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(40_000))
    create_sqp_target(pg, schema)
    register_table(pg, schema, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at", "batch_size": 2000,
                                       "transform": "slow_for_tests"})  # 20 batches x 0.15 s inside the COPY
    child = start_child()

    def copying() -> bool:
        row = pg.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'bq-refresh'"
                         " AND query ILIKE 'COPY%%' AND query ILIKE %s", (f"%{schema}%",)).fetchone()
        return bool(row and row[0])

    wait_until(copying, child, "the direct COPY to start")
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    deadline = time.monotonic() + 30
    while pg.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'bq-refresh'").fetchone() != (0,):
        assert time.monotonic() < deadline, "the killed run's sessions did not end"
        time.sleep(0.1)
    assert live(pg, schema) == []
    indexes = {r[0] for r in pg.execute("SELECT indexname FROM pg_indexes WHERE schemaname = %s AND tablename = 'sqp'",
                                        (schema,))}
    assert indexes == {"sqp_pkey", "sqp_by_asin"}

    rerun = refresh_table("sqp")
    assert rerun["status"] == "success" and rerun["direct_load"] is True and rerun["rows_inserted"] == 40_000
    assert rerun["interrupted_runs_closed"] == 1
    assert_same_rows(source_rows(source, "sqp"), live(pg, schema), SQP_KEY)
