"""Prefect artifacts: a table per run, progress of long loads, a markdown summary. Best effort.

Also the live progress of this process's table runs (phase, rows read of those expected, ETA) that
``bq-refresh run`` shows on a terminal: recorded by the engine where a phase begins, kept in memory only.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Any
from uuid import UUID

log = logging.getLogger(__name__)
ARTIFACT_COLUMNS = ["table", "status", "mode", "rows_read", "rows_inserted", "rows_updated", "rows_deleted",
                    "execution_time_ms", "checks", "views_failed"]


def _in_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def publish_table_artifact(rows: list[dict[str, Any]], *, key: str | None, title: str) -> None:
    """A table artifact with one row per refreshed table."""
    if not _in_run():
        return
    try:
        from prefect.artifacts import create_table_artifact

        cells = {"views_failed": lambda r: _cell(r.get("views_failed")), "checks": _checks}
        table = [{c: cells[c](r) if c in cells else r.get(c) for c in ARTIFACT_COLUMNS} for r in rows]
        create_table_artifact(table=table, key=key, description=title)
    except Exception as exc:  # noqa: BLE001 - artifacts never fail a refresh
        log.warning("table artifact not created: %s", exc)


def _checks(run: dict[str, Any]) -> str | None:
    """A run's quality checks as one cell: "5/6 passed; warned: null_fraction" (the soft checks that failed)."""
    warned = run.get("checks_warned") or []
    parts = [f"{run['checks_passed']}/{run['checks_run']} passed"] if run.get("checks_run") else []
    if warned:
        parts.append(f"warned: {', '.join(map(str, warned))}")
    return "; ".join(parts) or None


def _cell(views_failed: Any) -> str | None:
    """A run's failed dependent views as one cell: "view: error; ..."."""
    if not views_failed:
        return None
    return "; ".join(f"{v['view']}: {v.get('error') or 'not queryable'}" for v in views_failed)


def publish_markdown(markdown: str, *, key: str | None, title: str) -> None:
    if not _in_run():
        return
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown=markdown, key=key, description=title)
    except Exception as exc:  # noqa: BLE001
        log.warning("markdown artifact not created: %s", exc)


# The phases of a table's run, in order; the last ones (done, failed, skipped) come from its audit row.
PHASES = ("planning", "reading", "checking", "publishing")


@dataclass(frozen=True)
class TableProgress:
    """Where one table's run stands, as the engine last recorded it."""

    table: str
    phase: str
    started: float  # time.monotonic() when its planning began
    phase_started: float
    rows: int = 0  # rows read so far, those staged by an earlier attempt included
    expected: int = 0  # rows the read session expects (BigQuery's estimate); 0 = unknown
    read_from: int = 0  # rows already staged when this read began (a resumed run)
    read_started: float | None = None
    read_ended: float | None = None

    def rate(self, now: float) -> float | None:
        """Rows per second of this read (None before it began or within its first instant)."""
        if self.read_started is None:
            return None
        elapsed = (self.read_ended or now) - self.read_started
        return (self.rows - self.read_from) / elapsed if elapsed > 0.05 else None

    def eta_s(self, now: float) -> float | None:
        """Seconds until the read ends at the current rate: None when unknown or not reading."""
        rate = self.rate(now)
        if self.phase != "reading" or not self.expected or not rate:
            return None
        return max(self.expected - self.rows, 0) / rate


_live: dict[str, TableProgress] = {}
_live_lock = threading.Lock()
_phase_changed = threading.Event()


def record_phase(table: str, phase: str, *, expected_rows: int | None = None, rows: int = 0) -> None:
    """Record that ``table``'s run entered ``phase`` (one of PHASES); planning starts a new run of it."""
    now = time.monotonic()
    with _live_lock:
        before = _live.get(table)
        if phase == "planning" or before is None:
            before = TableProgress(table, phase, started=now, phase_started=now)
        current = replace(before, phase=phase, phase_started=now)
        if phase == "reading":
            current = replace(current, rows=rows, read_from=rows, expected=expected_rows or 0, read_started=now,
                              read_ended=None)
        elif before.phase == "reading":
            current = replace(current, read_ended=now)
        _live[table] = current
    _phase_changed.set()


def record_rows(table: str, rows: int) -> None:
    """Rows read so far by ``table``'s run (cheap: called after every batch)."""
    with _live_lock:
        if table in _live:
            _live[table] = replace(_live[table], rows=rows)


def live_progress(since: float = 0.0) -> list[TableProgress]:
    """The table runs of this process that began planning at ``since`` (time.monotonic()) or later."""
    with _live_lock:
        return sorted((p for p in _live.values() if p.started >= since), key=lambda p: p.started)


def wait_for_phase_change(timeout_s: float) -> bool:
    """Wait until some table enters a new phase or ``timeout_s`` passes; True when one did."""
    changed = _phase_changed.wait(timeout_s)
    _phase_changed.clear()
    return changed


def rows_expected(session_estimate: int, *, full: bool, whole_table: int | None,
                  period_rows: list[tuple[str | None, int]] | None) -> int:
    """The rows a read should bring (0: unknown). The plan's own counts at the read snapshot come first: the rows
    of the periods a window read reads, the whole table's rows for a full read; else BigQuery's estimate for the
    read session (the local emulator gives none)."""
    if period_rows is not None:
        return sum(rows for _, rows in period_rows)
    if full and whole_table is not None:
        return whole_table
    return max(session_estimate, 0)


def format_duration(seconds: float | None) -> str:
    """A duration as a person reads it at a glance: "-" unknown, "42s", "3m05s", "2h07m"."""
    if seconds is None:
        return "-"
    whole = int(seconds + 0.5)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def progress_cells(p: TableProgress, now: float) -> dict[str, str]:
    """The display of one table's run: phase, rows (of those expected, with the share), rows/s, ETA, elapsed."""
    rows = f"{p.rows:,}"
    if p.expected:
        rows += f" / {p.expected:,} ({min(100, 100 * p.rows // p.expected)}%)"
    rate = p.rate(now)
    eta = p.eta_s(now)
    return {"phase": p.phase, "rows": rows if p.read_started is not None else "",
            "rows/s": f"{rate:,.0f}" if rate is not None else "",
            "ETA": format_duration(eta) if eta is not None else ("?" if p.phase == "reading" else ""),
            "time": format_duration(now - p.started)}


class Progress:
    """A table's read: its rows in the live progress, and a progress artifact for a long load (updated at
    most every ``every`` rows). Creating it records the table's reading phase."""

    def __init__(self, table: str, expected_rows: int, every: int = 100_000, *, already: int = 0) -> None:
        self.table = table
        record_phase(table, "reading", expected_rows=expected_rows, rows=already)
        self.expected = max(expected_rows, 1)
        self.every = every
        self.last = 0
        self.id: UUID | None = None
        if _in_run() and expected_rows >= every:
            try:
                from prefect.artifacts import create_progress_artifact

                created = create_progress_artifact(progress=0.0, description=f"rows staged for {table}")
                self.id = created if isinstance(created, UUID) else None
            except Exception as exc:  # noqa: BLE001
                log.warning("progress artifact not created: %s", exc)

    def update(self, rows: int) -> None:
        record_rows(self.table, rows)
        if self.id is None or rows - self.last < self.every:
            return
        self.last = rows
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(artifact_id=self.id, progress=min(100.0, 100.0 * rows / self.expected))
        except Exception as exc:  # noqa: BLE001
            log.warning("progress artifact not updated: %s", exc)
