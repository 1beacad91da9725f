"""Source readiness: whether tonight's source is loaded (table metadata, a marker table), waited for up to a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from google.api_core.exceptions import NotFound

from tasks.spec import Readiness


@dataclass(frozen=True)
class SourceState:
    """What BigQuery says about a source now."""

    modified: datetime | None  # Table.modified (lastModifiedTime) of the source; None for a query source
    marker_present: bool | None  # None when no marker table is asked for


@dataclass(frozen=True)
class Decision:
    verdict: Literal["ready", "wait", "not_ready"]
    reason: str


def decide(condition: Readiness, state: SourceState, *, last_read: datetime | None, waited: timedelta) -> Decision:
    """Ready when every condition holds; otherwise wait until ``wait_minutes`` have passed, then not ready.

    Args:
        last_read: the read snapshot of the last successful publish (None: never read, so any source is new).
        waited: how long this run has waited so far.
    """
    missing = []
    if condition.marker_table and not state.marker_present:
        missing.append(f"marker table {condition.marker_table} absent")
    if condition.modified_since_last_read and last_read is not None and (
            state.modified is None or state.modified <= last_read):
        missing.append(f"source not modified since the last read ({last_read.isoformat()})")
    if not missing:
        return Decision("ready", "source ready")
    if waited >= timedelta(minutes=condition.wait_minutes):
        return Decision("not_ready", "; ".join(missing))
    return Decision("wait", "; ".join(missing))


def marker_name(template: str, now: datetime) -> str:
    """The marker table of the run at ``now``: {date} -> YYYYMMDD (UTC)."""
    return template.replace("{date}", now.astimezone(UTC).strftime("%Y%m%d"))


def source_modified(client: Any, table_ref: str) -> datetime | None:
    """The table's last modification from its metadata (None if it does not exist)."""
    try:
        modified = client.get_table(table_ref).modified
    except NotFound:
        return None
    return modified if isinstance(modified, datetime) else None


def read_state(client: Any, source_ref: str | None, marker_ref: str | None) -> SourceState:
    """Ask BigQuery (tables.get) for the source's last modification and whether the marker exists."""
    present = None if marker_ref is None else _exists(client, marker_ref)
    return SourceState(None if source_ref is None else source_modified(client, source_ref), present)


def _exists(client: Any, table_ref: str) -> bool:
    try:
        client.get_table(table_ref)
    except NotFound:
        return False
    return True


@dataclass(frozen=True)
class ReadinessOutcome:
    ready: bool
    reason: str
    checks: int
    waited_s: float
    source_modified: datetime | None


def wait_until_ready(
    condition: Readiness, check: Callable[[], SourceState], *, last_read: datetime | None,
    sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
) -> ReadinessOutcome:
    """Check, and check again every ``check_every_minutes`` until ready or past ``wait_minutes``.

    Args:
        check: reads the source's state (BigQuery metadata) once.
        sleep, clock: injectable so tests wait in seconds.
    """
    started = clock()
    checks = 0
    while True:
        state = check()
        checks += 1
        waited = clock() - started
        decision = decide(condition, state, last_read=last_read, waited=timedelta(seconds=waited))
        if decision.verdict != "wait":
            return ReadinessOutcome(decision.verdict == "ready", decision.reason, checks, waited, state.modified)
        remaining = condition.wait_minutes * 60 - waited
        sleep(max(0.0, min(condition.check_every_minutes * 60, remaining)))


def source_stale_without_condition(rows_read: int, modified: datetime | None, now: datetime, stale_hours: float) -> bool:
    """A night that read nothing from a source unchanged for longer than ``stale_hours`` is not a quiet success."""
    return rows_read == 0 and modified is not None and now - modified > timedelta(hours=stale_hours)
