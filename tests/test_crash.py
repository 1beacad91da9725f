"""PostgreSQL itself crashes (``pg_ctl stop -m immediate``: no checkpoint, UNLOGGED staging emptied by crash
recovery) at several points of a refresh; after the restart ONE rerun leaves the live table equal to the
source, value by value, with no duplicate key and truthful audit rows.

Crash points: early in the stage, late in the stage, inside the publish (the merge waits on a lock the test
holds, and the server dies there), during a direct initial load (inside its one COPY). The README's test
command runs every crash point x every mode with row hashes on and the changed rows late in the stream;
``BQ_REFRESH_CRASH_MATRIX=full`` adds row hashes off, changed rows early, and the staged path on an empty
target (docs/reliability.md).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pytest

import tests.killable_refresh  # noqa: F401  (registers the slow transform here too)
from blocks import BigQuerySource
from bq_refresh.services import free_port
from bq_refresh.settings import Settings
from flows.refresh_table import refresh_table
from tasks.migrations import apply_migrations
from tasks.registry import register_table
from tests.bqdata import assert_same_rows, pg_rows, put_table, source_rows
from tests.conftest import ROOT
from tests.test_engine import SQP_KEY, SQP_SCHEMA, T0, sqp_rows

pytestmark = [pytest.mark.emulator, pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

TOTAL, BATCH, WEEKS = 6000, 250, 6


class CrashablePostgres:
    """A PostgreSQL cluster of its own (same binaries as the suite's server), which the test crashes."""

    def __init__(self, bindir: Path, root: Path) -> None:
        self.bindir, self.data, self.port = bindir, root / "data", free_port()
        root.mkdir(parents=True, exist_ok=True)
        self.runas: list[str] = []
        if os.getuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True)
            shutil.chown(root, "postgres")
            self.runas = ["runuser", "-u", "postgres", "--"]
        subprocess.run([*self.runas, str(bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8"], check=True, capture_output=True)
        self.start()

    @property
    def uri(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def pg_ctl(self, *args: str) -> None:
        subprocess.run([*self.runas, str(self.bindir / "pg_ctl"), "-D", str(self.data), *args], check=True,
                       capture_output=True, timeout=120)

    def start(self) -> None:
        self.pg_ctl("-l", str(self.data.parent / "log"), "-w", "-o",
                    f"-p {self.port} -k /tmp -c listen_addresses=127.0.0.1 -c max_connections=100", "start")

    def crash(self) -> None:
        """Immediate shutdown: every backend killed, no shutdown checkpoint; the restart runs crash recovery."""
        self.pg_ctl("-m", "immediate", "-w", "stop")

    def stop(self) -> None:
        try:
            self.pg_ctl("-m", "fast", "-w", "stop")
        except subprocess.CalledProcessError:
            pass


@pytest.fixture(scope="module")
def crashable(pg_uri: str) -> Iterator[CrashablePostgres]:
    with psycopg.connect(pg_uri, autocommit=True) as conn:
        row = conn.execute("SHOW data_directory").fetchone()
    pidfile = Path(str(row[0] if row else ""), "postmaster.pid")
    if not pidfile.exists():
        pytest.skip("the suite's PostgreSQL is not on this machine: no binaries to start a crashable one")
    bindir = Path(os.readlink(f"/proc/{int(pidfile.read_text().split()[0])}/exe")).parent
    # Not under /tmp/pytest-of-root (mode 700): the server runs as the postgres user when the suite is root.
    root = ROOT / ".state" / "tests" / f"crashable-pg-{os.getpid()}"
    shutil.rmtree(root, ignore_errors=True)
    server = CrashablePostgres(bindir, root)
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


CI_CASES = [(point, mode, True, "late") for point in ("stage_early", "stage_late", "publish", "direct")
            for mode in ("incremental", "window")]
FULL_CASES = CI_CASES + [(point, mode, hashes, where) for point in ("stage_early", "stage_late", "publish", "direct",
                                                                    "staged_empty")
                         for mode in ("incremental", "window") for hashes in (True, False)
                         for where in ("late", "early") if (point, mode, hashes, where) not in CI_CASES]
CASES = FULL_CASES if os.environ.get("BQ_REFRESH_CRASH_MATRIX") == "full" else CI_CASES


def changed_source(rows: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """10% of the rows changed (new values and cursor), one deleted, ten added; placed late or early in the
    stream (the emulator streams rows in load order)."""
    changed = [dict(r, impressions=r["impressions"] + 1, updated_at=T0 + timedelta(days=3)) for r in rows[::10]]
    rest = [r for i, r in enumerate(rows) if i % 10 and i != 7]
    added = [dict(rows[0], search_query=f"new {i}", updated_at=T0 + timedelta(days=3)) for i in range(10)]
    return rest + changed + added if where == "late" else changed + added + rest


def live(conn: psycopg.Connection[Any], schema: str) -> list[dict[str, Any]]:
    exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f'"{schema}".sqp',)).fetchone()
    return pg_rows(conn, f'"{schema}".sqp', "1, 2, 3") if exists and exists[0] else []


def put(source: BigQuerySource, rows: list[dict[str, Any]]) -> None:
    put_table(source, "sqp", SQP_SCHEMA, pa.Table.from_pylist(rows, schema=sqp_rows(1).schema))


def checkpoint_offsets(conn: psycopg.Connection[Any], schema: str) -> int:
    row = conn.execute(f"SELECT checkpoint_data->'offsets' FROM \"{schema}\".refresh_checkpoints"
                       " WHERE status = 'active'").fetchone()
    return sum(int(v) for v in (row[0] or {}).values()) if row else 0


def wait_for(predicate: Any, child: subprocess.Popen[bytes], what: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except psycopg.Error:
            pass
        if child.poll() is not None:
            err = child.stderr.read().decode()[-3000:] if child.stderr else ""
            raise AssertionError(f"the refresh ended (rc {child.returncode}) before {what}: {err}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def refresh_child(*args: str) -> subprocess.Popen[bytes]:
    """tests/killable_refresh.py in a child process, on this test session's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    return subprocess.Popen([sys.executable, "-m", "tests.killable_refresh", *args], cwd=ROOT,
                            env={**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def publish_waits(conn: psycopg.Connection[Any]) -> Any:
    """True once a publish's merge waits on a lock (the test's) inside its transaction."""
    return lambda: bool(conn.execute(
        "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query ILIKE 'WITH up AS%'").fetchone())


def crash_while_publish_waits(crashable: CrashablePostgres, conn: psycopg.Connection[Any], table: str,
                              args: list[str], what: str) -> int:
    """Run tests/killable_refresh.py with ``args`` while the test holds a SHARE lock on ``table`` (SQL), crash
    PostgreSQL once the publish waits on it inside its transaction; the child's exit code."""
    blocker = psycopg.connect(crashable.uri)
    blocker.execute(f"LOCK TABLE {table} IN SHARE MODE")
    child = refresh_child(*args)
    try:
        wait_for(publish_waits(conn), child, what)
        crashable.crash()
    finally:
        rc = child.wait(timeout=180)
        blocker.close()
    return rc


@pytest.mark.parametrize(("point", "mode", "hashes", "where"), CASES,
                         ids=["-".join([p, m, "hash" if h else "nohash", w]) for p, m, h, w in CASES])
def test_a_postgres_crash_then_one_rerun_is_exact(
    env: Settings, crashable: CrashablePostgres, monkeypatch: pytest.MonkeyPatch,
    point: str, mode: str, hashes: bool, where: str,
) -> None:
    schema = env.schema_name
    monkeypatch.setenv("BQ_REFRESH_DATABASE_URL", crashable.uri)
    monkeypatch.setenv("REFRESH_RETRIES", "0")  # the crashed run fails; the rerun is the test's one rerun
    source = BigQuerySource.from_settings(env)
    rows = sqp_rows(TOTAL, weeks=WEEKS).to_pylist()
    spec: dict[str, Any] = {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at", "batch_size": BATCH,
                            "row_hash": hashes, "transform": "slow_for_tests", "lookback": "1d",
                            "direct_initial_load": point == "direct"}
    if mode == "window":
        spec |= {"mode": "window", "window_column": "start_date"}
    else:
        spec |= {"delete_policy": {"mode": "hard"}}
    empty_target = point in ("direct", "staged_empty")
    conn = psycopg.connect(crashable.uri, autocommit=True)
    try:
        apply_migrations(conn, schema)
        register_table(conn, schema, "sqp", spec)
        if empty_target:
            put(source, rows)
        else:
            put(source, rows)
            register_table(conn, schema, "sqp", {**spec, "transform": None, "direct_initial_load": True})
            assert refresh_table("sqp")["status"] == "success"
            register_table(conn, schema, "sqp", spec)
            put(source, changed_source(rows, where))
        before = live(conn, schema)

        child = refresh_child("sqp")
        blocker = None
        try:
            if point == "stage_early":
                wait_for(lambda: checkpoint_offsets(conn, schema) >= 2 * BATCH, child, "two batches staged")
            elif point in ("stage_late", "staged_empty"):
                read_total = TOTAL if empty_target or mode == "window" else TOTAL // 3
                wait_for(lambda: checkpoint_offsets(conn, schema) >= read_total * 0.6, child, "most batches staged")
            elif point == "direct":
                wait_for(lambda: (conn.execute("SELECT coalesce(sum(tuples_processed), 0) FROM pg_stat_progress_copy"
                                               ).fetchone() or (0,))[0] >= 1000, child, "the direct COPY under way")
            else:  # publish: the merge waits on our lock inside its transaction, and the server dies there
                blocker = psycopg.connect(crashable.uri)
                blocker.execute(f'LOCK TABLE "{schema}".sqp IN SHARE MODE')
                wait_for(publish_waits(conn), child, "the publish waiting inside its transaction")
            crashable.crash()
        finally:
            rc = child.wait(timeout=180)
            if blocker is not None:
                blocker.close()
        assert rc != 0, "the crashed run must not report success"
    finally:
        conn.close()

    crashable.start()
    with psycopg.connect(crashable.uri, autocommit=True) as conn:
        assert live(conn, schema) == before  # as before (an empty or absent table for a first load): never half-way
        rerun = refresh_table("sqp")
        assert rerun["status"] == "success", rerun
        assert_same_rows(source_rows(source, "sqp"), pg_rows(conn, f'"{schema}".sqp', "1, 2, 3"), SQP_KEY)
        dupes = conn.execute(f'SELECT count(*) - count(DISTINCT (start_date, asin, search_query)) FROM "{schema}".sqp'
                             ).fetchone()
        assert dupes == (0,)
        audit = conn.execute(f'SELECT status, rows_inserted, rows_updated, rows_deleted FROM "{schema}".refresh_audit_log'
                             " ORDER BY id").fetchall()
        statuses = [a[0] for a in audit]
        assert statuses[-1] == "success" and statuses[-2] == "failed", audit  # the crashed run closed as failed
        if not empty_target:
            assert audit[-1][1:] == (10, TOTAL // 10, 1), audit  # what the rerun changed, exactly
        else:
            assert audit[-1][1] == TOTAL, audit


def test_a_postgres_crash_inside_a_group_publish_leaves_every_member_as_before_then_one_rerun_is_exact(
    env: Settings, crashable: CrashablePostgres, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A publish group's transaction has published its first member and waits (on a lock the test holds) to
    publish the second when the server dies: after the restart both live tables are exactly as before (the first
    member's publish was never visible), and one rerun of the night publishes both, exact."""
    schema = env.schema_name
    monkeypatch.setenv("BQ_REFRESH_DATABASE_URL", crashable.uri)
    monkeypatch.setenv("REFRESH_RETRIES", "0")
    source = BigQuerySource.from_settings(env)
    rows = sqp_rows(TOTAL // 2, weeks=WEEKS).to_pylist()
    spec: dict[str, Any] = {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at", "batch_size": BATCH,
                            "lookback": "1d", "delete_policy": {"mode": "hard"}, "publish_group": "joined"}
    conn = psycopg.connect(crashable.uri, autocommit=True)
    try:
        apply_migrations(conn, schema)
        conn.execute(f'DROP TABLE IF EXISTS "{schema}".sqp, "{schema}".sqp_copy')
        register_table(conn, schema, "sqp", spec, priority=200)  # published first in the group's transaction
        register_table(conn, schema, "sqp_copy", spec)
        put(source, rows)
        from flows.daily_refresh import daily_refresh

        assert daily_refresh(force=True, return_state=True).is_completed()
        put(source, changed_source(rows, "late"))
        before = {t: pg_rows(conn, f'"{schema}".{t}', "1, 2, 3") for t in ("sqp", "sqp_copy")}

        # sqp merged inside the group's transaction (its rows locked), sqp_copy's merge waiting on our lock.
        rc = crash_while_publish_waits(crashable, conn, f'"{schema}".sqp_copy', ["--nightly"],
                                       "the group's publish waiting on its second member")
        assert rc != 0, "the crashed night must not report success"
    finally:
        conn.close()

    crashable.start()
    with psycopg.connect(crashable.uri, autocommit=True) as conn:
        for t in ("sqp", "sqp_copy"):  # neither member half-published, the first one not alone
            assert pg_rows(conn, f'"{schema}".{t}', "1, 2, 3") == before[t], t
        assert daily_refresh(force=True, return_state=True).is_completed()
        expected = source_rows(source, "sqp")
        for t in ("sqp", "sqp_copy"):
            assert_same_rows(expected, pg_rows(conn, f'"{schema}".{t}', "1, 2, 3"), SQP_KEY)
        writers = {r[0] for t in ("sqp", "sqp_copy")
                   for r in conn.execute(f'SELECT DISTINCT xmin::text FROM "{schema}".{t} WHERE updated_at > %s',
                                         (T0 + timedelta(days=2),))}
        assert len(writers) == 1  # tonight's rows of both members written by one transaction
        audit = conn.execute(f'SELECT table_name, status, rows_inserted, rows_updated, rows_deleted'
                             f' FROM "{schema}".refresh_audit_log ORDER BY id').fetchall()
        for t in ("sqp", "sqp_copy"):
            mine = [a[1:] for a in audit if a[0] == t]
            assert mine[-1] == ("success", 10, TOTAL // 20, 1), audit  # what the rerun changed, exactly
            assert mine[-2][0] == "failed", audit  # the crashed night's row, closed as interrupted


def test_a_postgres_crash_inside_a_repair_by_key_leaves_the_table_as_before_then_one_rerun_mends_exactly_those_rows(
    env: Settings, crashable: CrashablePostgres, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """verify --repair's run by key (three keys: one edited by hand, one deleted by hand, one made by hand) waits
    inside its publish on a lock the test holds when the server dies: after the restart the live table is exactly as
    before (hand edits and all), and one rerun of the repair makes it equal to the source, rewriting only those keys
    and leaving the watermark where the night left it."""
    import json

    schema = env.schema_name
    monkeypatch.setenv("BQ_REFRESH_DATABASE_URL", crashable.uri)
    monkeypatch.setenv("REFRESH_RETRIES", "0")
    source = BigQuerySource.from_settings(env)
    rows = sqp_rows(TOTAL // 4, weeks=WEEKS).to_pylist()
    spec: dict[str, Any] = {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at", "mode": "window",
                            "window_column": "start_date"}
    t = f'"{schema}".sqp'
    conn = psycopg.connect(crashable.uri, autocommit=True)
    try:
        apply_migrations(conn, schema)
        conn.execute(f"DROP TABLE IF EXISTS {t}")
        register_table(conn, schema, "sqp", spec)
        put(source, rows)
        assert refresh_table("sqp")["status"] == "success"
        edited, deleted = rows[3], rows[4]
        conn.execute(f"UPDATE {t} SET impressions = -1 WHERE start_date = %s AND asin = %s AND search_query = %s",
                     (edited["start_date"], edited["asin"], edited["search_query"]))
        conn.execute(f"DELETE FROM {t} WHERE start_date = %s AND asin = %s AND search_query = %s",
                     (deleted["start_date"], deleted["asin"], deleted["search_query"]))
        conn.execute(f"INSERT INTO {t} SELECT start_date, asin, 'made by hand', impressions, click_share,"
                     f" median_price, updated_at FROM {t} LIMIT 1")
        made = conn.execute(f"SELECT start_date::text, asin FROM {t} WHERE search_query = 'made by hand'").fetchone()
        assert made is not None
        keys = [[str(r["start_date"]), r["asin"], r["search_query"]] for r in (edited, deleted)]
        keys.append([made[0], made[1], "made by hand"])
        before = live(conn, schema)
        night = conn.execute(f'SELECT watermark, last_refresh_at FROM "{schema}".refresh_config').fetchone()

        rc = crash_while_publish_waits(crashable, conn, t, ["--repair-keys", "sqp", json.dumps(keys)],
                                       "the repair's publish waiting inside its transaction")
        assert rc != 0, "the crashed repair must not report success"
    finally:
        conn.close()

    crashable.start()
    mended = [edited[k] for k in SQP_KEY] + [deleted[k] for k in SQP_KEY]
    with psycopg.connect(crashable.uri, autocommit=True) as conn:
        assert live(conn, schema) == before  # never half-way: the hand edits are all still there
        untouched = conn.execute(f"SELECT start_date, asin, search_query, xmin::text FROM {t} WHERE NOT (search_query"
                                 " = 'made by hand' OR (start_date, asin, search_query) IN ((%s, %s, %s), (%s, %s, %s))) ORDER BY 1, 2, 3",
                                 mended).fetchall()
        rerun = refresh_table("sqp", repair_keys=keys)
        assert (rerun["status"], rerun["rows_inserted"], rerun["rows_updated"], rerun["rows_deleted"]) == (
            "success", 1, 1, 1), rerun
        assert_same_rows(source_rows(source, "sqp"), pg_rows(conn, f'"{schema}".sqp', "1, 2, 3"), SQP_KEY)
        assert conn.execute(f"SELECT start_date, asin, search_query, xmin::text FROM {t} WHERE NOT (search_query"
                            " = 'made by hand' OR (start_date, asin, search_query) IN ((%s, %s, %s), (%s, %s, %s))) ORDER BY 1, 2, 3",
                            mended).fetchall() == untouched  # every other row kept its xmin
        assert conn.execute(f'SELECT watermark, last_refresh_at FROM "{schema}".refresh_config').fetchone() == night
