"""Disk headroom: a full or initial load that would not fit in REFRESH_DISK_BUDGET_MB is refused before it loads
anything, naming the table, the estimate and the budget; `bq-refresh doctor` shows the headroom, or says it is
unknown when no budget is set (PostgreSQL cannot tell a disk's free space over SQL)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from blocks import BigQuerySource
from bq_refresh.errors import DiskBudgetExceeded
from bq_refresh.settings import Settings
from flows.refresh_table import refresh_table
from tasks.headroom import MIB, ROW_OVERHEAD_BYTES, DiskUse, judge, load_need, mib
from tasks.registry import register_table
from tests.bqdata import put_table
from tests.conftest import ROOT
from tests.test_engine import SQP_KEY, SQP_SCHEMA, sqp_rows


@pytest.mark.parametrize(("case", "need"), [
    (dict(target_bytes=0, empty=True, direct=True, source_rows=1000, source_bytes=80_000), 80_000 + 1000 * ROW_OVERHEAD_BYTES),
    (dict(target_bytes=0, empty=True, direct=False, source_rows=1000, source_bytes=80_000),
     2 * (80_000 + 1000 * ROW_OVERHEAD_BYTES)),
    (dict(target_bytes=0, empty=True, direct=False, source_rows=0, source_bytes=0), None),  # the source says nothing
    (dict(target_bytes=10 * MIB, empty=False, direct=False, source_rows=0, source_bytes=0), 20 * MIB),
    (dict(target_bytes=10 * MIB, empty=False, direct=False, source_rows=1000, source_bytes=MIB), 20 * MIB),
    (dict(target_bytes=10 * MIB, empty=False, direct=False, source_rows=0, source_bytes=30 * MIB), 40 * MIB),
], ids=["initial direct", "initial staged", "initial unknown", "reload: the table twice", "reload: smaller source",
        "reload: the source grew"])
def test_load_need(case: dict[str, Any], need: int | None) -> None:
    assert load_need(**case) == need


@pytest.mark.parametrize(("use", "largest", "size", "status", "says"), [
    (DiskUse(100 * MIB, 20 * MIB, None), "sqp.t", 10 * MIB, "unknown", "120.0 MB used: database 100.0 MB + WAL 20.0 MB;"
     " a full reload of the largest target, sqp.t (10.0 MB), needs about 20.0 MB; free space unknown"),
    (DiskUse(100 * MIB, None, 500 * MIB), "sqp.t", 10 * MIB, "ok", "headroom 400.0 MB of REFRESH_DISK_BUDGET_MB=500"
     " (100.0 MB used: database 100.0 MB (WAL not counted: pg_ls_waldir() needs superuser or pg_monitor)); a full"),
    (DiskUse(100 * MIB, 0, 110 * MIB), "sqp.t", 5 * MIB, "ok", "headroom 10.0 MB"),  # needs exactly the 10 MB left
    (DiskUse(100 * MIB, 0, 110 * MIB), "sqp.t", 6 * MIB, "warn", "needs about 12.0 MB, more than the headroom: it"
     " would be refused"),
    (DiskUse(100 * MIB, 0, 110 * MIB), None, 0, "ok", "headroom 10.0 MB of REFRESH_DISK_BUDGET_MB=110 (100.0 MB used:"
     " database 100.0 MB + WAL 0.0 MB)"),
    (DiskUse(100 * MIB, 50 * MIB, 120 * MIB), "sqp.t", 10 * MIB, "fail", "over REFRESH_DISK_BUDGET_MB=120 by 30.0 MB"),
], ids=["no budget", "no WAL", "fits exactly", "a reload would not fit", "no target", "over budget"])
def test_judge(use: DiskUse, largest: str | None, size: int, status: str, says: str) -> None:
    got = judge(use, largest, size)
    assert got[0] == status and says in got[1], got


def table_state(pg: psycopg.Connection[Any], schema: str, staging: str) -> tuple[Any, ...]:
    rows = pg.execute(sql.SQL("SELECT count(*), sum(impressions) FROM {}").format(sql.Identifier(schema, "sqp"))).fetchone()
    staged = pg.execute("SELECT count(*) FROM pg_tables WHERE schemaname = %s AND tablename NOT LIKE '%%rowhash'",
                        (staging,)).fetchone()
    active = pg.execute(sql.SQL("SELECT count(*) FROM {} WHERE status = 'active'").format(
        sql.Identifier(schema, "refresh_checkpoints"))).fetchone()
    return rows, staged, active


def last_audit(pg: psycopg.Connection[Any], schema: str) -> tuple[Any, ...]:
    row = pg.execute(sql.SQL("SELECT status, error_message FROM {} ORDER BY id DESC LIMIT 1").format(
        sql.Identifier(schema, "refresh_audit_log"))).fetchone()
    assert row is not None
    return tuple(row)


@pytest.mark.emulator
@pytest.mark.usefixtures("prefect_harness")
def test_a_load_that_does_not_fit_the_budget_is_refused_before_it_loads(
    env: Settings, source: BigQuerySource, registry: str, pg: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    staging = env.staging_schema
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(2000))
    register_table(pg, registry, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})

    # A budget the database already exceeds: the initial load is refused, named and explained, nothing loaded.
    monkeypatch.setenv("REFRESH_DISK_BUDGET_MB", "1")
    with pytest.raises(DiskBudgetExceeded) as refused:
        refresh_table("sqp")
    message = str(refused.value)
    assert message.startswith(f"{registry}.sqp: an initial load needs about ")
    assert "the source's 2,000 rows" in message and f"+ {ROW_OVERHEAD_BYTES} bytes a row)" in message  # direct load
    assert "but REFRESH_DISK_BUDGET_MB=1 is used up already (" in message and "nothing was loaded" in message
    assert table_state(pg, registry, staging) == ((0, None), (0,), (0,))
    assert last_audit(pg, registry) == ("failed", message)

    # Without a budget the headroom is unknown and nothing is refused.
    monkeypatch.delenv("REFRESH_DISK_BUDGET_MB")
    assert refresh_table("sqp")["rows_inserted"] == 2000
    loaded = table_state(pg, registry, staging)

    # A full reload with a budget that leaves less than twice the table: refused, the table as it was.
    monkeypatch.setenv("REFRESH_DISK_BUDGET_MB", "1")
    size = pg.execute("SELECT pg_total_relation_size(%s::regclass)", (f'"{registry}".sqp',)).fetchone()
    assert size is not None
    with pytest.raises(DiskBudgetExceeded) as refused:
        refresh_table("sqp", full_refresh=True)
    message = str(refused.value)
    assert message.startswith(f"{registry}.sqp: a full reload needs about {mib(2 * size[0])} ({registry}.sqp takes"
                              f" {mib(size[0])}: staging and the old versions of updated rows take about as much again)")
    assert table_state(pg, registry, staging) == loaded
    assert last_audit(pg, registry)[0] == "failed"

    # A budget with room: the same reload runs.
    monkeypatch.setenv("REFRESH_DISK_BUDGET_MB", str(1024 * 1024))
    again = refresh_table("sqp", full_refresh=True)
    assert again["status"] == "success" and again["rows_read"] == 2000


def doctor(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROOT / ".venv" / "bin" / "bq-refresh"), "doctor", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.emulator
@pytest.mark.usefixtures("prefect_harness")
def test_doctor_shows_the_headroom_or_says_it_is_unknown(
    env: Settings, source: BigQuerySource, registry: str, pg: psycopg.Connection[Any], tmp_path: Path,
) -> None:
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(1000))
    register_table(pg, registry, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})
    assert refresh_table("sqp")["status"] == "success"
    base = {k: v for k, v in os.environ.items() if k != "REFRESH_DISK_BUDGET_MB"}
    base["BQ_REFRESH_STATE_DIR"] = str(tmp_path)

    unknown = doctor(base)
    assert unknown.returncode == 0, unknown.stderr
    shown = unknown.stdout.strip().split("\n")  # one line per check, never wrapped
    session = next(text for text in shown if " session: " in text)
    line = next(text for text in shown if " disk: " in text)
    assert session.startswith("OK      session: session state survives"), session  # the pooler probe
    assert line.startswith("UNKNOWN disk: ")
    assert f"a full reload of the largest target, {registry}.sqp (" in line
    assert "free space unknown: PostgreSQL does not report a disk's free space over SQL; set REFRESH_DISK_BUDGET_MB" in line
    report = next(c for c in json.loads(doctor(base, "--json").stdout)["checks"] if c["name"] == "disk")
    assert report["status"] == "unknown" and report["headroom_bytes"] is None and report["budget_bytes"] is None
    assert report["database_bytes"] > 0 and report["largest_target"] == f"{registry}.sqp"
    size = pg.execute("SELECT pg_total_relation_size(%s::regclass)", (f'"{registry}".sqp',)).fetchone()
    assert size is not None and report["largest_target_bytes"] == size[0] and report["full_reload_need_bytes"] == 2 * size[0]

    roomy = doctor({**base, "REFRESH_DISK_BUDGET_MB": str(1024 * 1024)})
    assert roomy.returncode == 0 and "\nOK      disk: headroom " in roomy.stdout, roomy.stdout
    assert "of REFRESH_DISK_BUDGET_MB=1048576 (" in roomy.stdout

    full = doctor({**base, "REFRESH_DISK_BUDGET_MB": "1"})
    assert full.returncode == 1 and "\nFAIL    disk: " in full.stdout, full.stdout
    assert "over REFRESH_DISK_BUDGET_MB=1 by " in full.stdout and "every full or initial load is refused" in full.stdout
