"""Live progress of `bq-refresh run` on a terminal: per table the phase (planning, reading, checking, publishing, then
done or failed), rows read of those expected with rows/s and an ETA; Prefect's INFO log lines never cut through the
live display. The formatting as pure cases; the display through the real entry point in a pseudo-terminal, against
the test PostgreSQL and the BigQuery emulator."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest

from bq_refresh.settings import Settings
from tasks.artifacts import (
    Progress,
    TableProgress,
    format_duration,
    live_progress,
    progress_cells,
    record_phase,
)
from tests.bqdata import bq_schema, put_table
from tests.conftest import ROOT

BIN = ROOT / ".venv" / "bin" / "bq-refresh"


@pytest.mark.parametrize(("seconds", "shown"), [
    (None, "-"), (0, "0s"), (0.4, "0s"), (42.4, "42s"), (59.6, "1m00s"), (185, "3m05s"), (3599, "59m59s"),
    (3600, "1h00m"), (7620, "2h07m"),
])
def test_format_duration(seconds: float | None, shown: str) -> None:
    assert format_duration(seconds) == shown


T0 = 1000.0


@pytest.mark.parametrize(("progress", "now", "cells"), [
    # planning: no rows yet, no rate, no ETA; the time since the table began
    (TableProgress("s.t", "planning", started=T0, phase_started=T0), T0 + 2,
     {"phase": "planning", "rows": "", "rows/s": "", "ETA": "", "time": "2s"}),
    # reading 25,000 of 100,000 in 10 s: 2,500 rows/s, 75,000 to go: 30 s
    (TableProgress("s.t", "reading", started=T0, phase_started=T0 + 5, rows=25_000, expected=100_000,
                   read_started=T0 + 5), T0 + 15,
     {"phase": "reading", "rows": "25,000 / 100,000 (25%)", "rows/s": "2,500", "ETA": "30s", "time": "15s"}),
    # a resumed read: the 40,000 rows staged before count in the share, not in the rate
    (TableProgress("s.t", "reading", started=T0, phase_started=T0, rows=50_000, expected=100_000, read_from=40_000,
                   read_started=T0), T0 + 100,
     {"phase": "reading", "rows": "50,000 / 100,000 (50%)", "rows/s": "100", "ETA": "8m20s", "time": "1m40s"}),
    # BigQuery gave no estimate: rows and rate, the ETA unknown
    (TableProgress("s.t", "reading", started=T0, phase_started=T0, rows=7_000, read_started=T0), T0 + 7,
     {"phase": "reading", "rows": "7,000", "rows/s": "1,000", "ETA": "?", "time": "7s"}),
    # more rows than the estimate: never past 100%, nothing left to wait for
    (TableProgress("s.t", "reading", started=T0, phase_started=T0, rows=1_200, expected=1_000, read_started=T0),
     T0 + 2, {"phase": "reading", "rows": "1,200 / 1,000 (100%)", "rows/s": "600", "ETA": "0s", "time": "2s"}),
    # checking after a 4 s read: the read's rate stays, no ETA
    (TableProgress("s.t", "checking", started=T0, phase_started=T0 + 5, rows=8_000, expected=8_000, read_started=T0 + 1,
                   read_ended=T0 + 5), T0 + 60,
     {"phase": "checking", "rows": "8,000 / 8,000 (100%)", "rows/s": "2,000", "ETA": "", "time": "1m00s"}),
])
def test_progress_cells(progress: TableProgress, now: float, cells: dict[str, str]) -> None:
    assert progress_cells(progress, now) == cells


def test_phases_recorded_in_order_and_a_new_run_starts_over() -> None:
    table = f"s.progress_{os.getpid()}_{time.monotonic_ns()}"
    began = time.monotonic()
    record_phase(table, "planning")
    progress = Progress(table, 1_000, already=200)
    progress.update(700)
    (mine,) = [p for p in live_progress(since=began) if p.table == table]
    assert (mine.phase, mine.rows, mine.read_from, mine.expected) == ("reading", 700, 200, 1_000)
    record_phase(table, "checking")
    record_phase(table, "publishing")
    (mine,) = [p for p in live_progress(since=began) if p.table == table]
    assert mine.phase == "publishing" and mine.read_ended is not None and mine.rows == 700
    later = time.monotonic()
    record_phase(table, "planning")  # the table's next run
    (mine,) = [p for p in live_progress(since=later) if p.table == table]
    assert (mine.phase, mine.rows, mine.read_started) == ("planning", 0, None)


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")
PREFECT_INFO = re.compile(r"\|\s*INFO\s*\|")


def run_in_terminal(args: list[str], env: dict[str, str], timeout_s: float = 300) -> tuple[int, str]:
    """Run ``args`` with a pseudo-terminal (200 x 50) as stdout and stderr; return its exit code and everything it
    wrote, as the terminal received it."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env, cwd=ROOT,
                            close_fds=True)
    os.close(follower)
    out = bytearray()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # EIO: the program closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        else:
            raise AssertionError(f"still running after {timeout_s} s: {out.decode(errors='replace')[-3000:]}")
        return proc.wait(timeout=30), out.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)


def live_frames(text: str) -> str:
    """What the terminal received from the first frame of the live display (its title) to the end of the last."""
    first, last = text.index("bq-refresh run"), text.rindex("bq-refresh run")
    end = text.index("└", last)
    return text[first:text.index("\n", end)]


def phases_shown(screen: str, table: str) -> list[str]:
    """The phases a table's row of the live display showed, in order, each once per change."""
    seen: list[str] = []
    for line in screen.splitlines():
        match = re.search(re.escape(table) + r"\s*│\s*([a-z]+(?: \(warning\))?)\s*│", line)
        if match and (not seen or seen[-1] != match.group(1)):
            seen.append(match.group(1))
    return seen


@pytest.mark.emulator
@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.once  # a terminal's view: the same on either server
def test_run_on_a_terminal_shows_each_phase_and_no_log_line_cuts_through(env: Settings, registry: str,
                                                                         source: Any) -> None:
    """`bq-refresh run` in a pseudo-terminal: the table's row goes planning -> reading (rows of those expected)
    -> checking -> publishing -> done, both for an initial load (straight into the empty table) and a reload
    (through staging); not one Prefect INFO line between the first and the last frame of the live display."""
    from prefect.settings import PREFECT_API_URL

    from tasks.registry import register_table

    rows = 30_000
    start = datetime(2025, 1, 1, tzinfo=UTC)
    data = pa.table({"id": pa.array(range(rows), pa.int64()),
                     "label": pa.array([f"row {i}" for i in range(rows)]),
                     "updated_at": pa.array([start + timedelta(seconds=i) for i in range(rows)],
                                            pa.timestamp("us", tz="UTC"))})
    put_table(source, "events", bq_schema([("id", "INT64", "REQUIRED"), ("label", "STRING"),
                                           ("updated_at", "TIMESTAMP")]), data)
    import psycopg

    assert env.database_url is not None
    with psycopg.connect(env.database_url.get_secret_value(), autocommit=True) as conn:
        # deletes reconciled: the plan counts the source's rows, the rows expected (the emulator gives no estimate)
        register_table(conn, registry, "events", {"source": "events", "key": ["id"], "cursor": "updated_at",
                                                  "batch_size": 2_000, "delete_policy": {"mode": "hard"}})
    table = f"{registry}.events"
    terminal_env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "TERM": "xterm-256color"}
    terminal_env.pop("COLUMNS", None)
    for label, extra in (("initial load", []), ("reload", ["--full-refresh"])):
        code, screen = run_in_terminal([str(BIN), "run", "--table", "events", *extra], terminal_env)
        text = ANSI.sub("", screen)
        assert code == 0, (label, text[-4000:])
        live = live_frames(text)
        assert phases_shown(live, table) == ["planning", "reading", "checking", "publishing", "done"], (
            label, phases_shown(live, table), text[-4000:])
        assert re.search(re.escape(table) + rf"\s*│\s*reading\s*│\s*[\d,]+ / {rows:,} \(\d+%\)", live), [
            line for line in live.splitlines() if "reading" in line]
        cut = [line for line in live.splitlines() if PREFECT_INFO.search(line)]
        assert cut == [], (label, cut[:5])
        assert f"{table} │ success" in text[len(live):], text[-3000:]  # then the run's summary, once
