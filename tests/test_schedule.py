"""Due-ness follows the schedule: 14 simulated nights on a real PostgreSQL with a clock the test controls."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from typing import Any

import psycopg
import pytest

from tasks.migrations import apply_migrations
from tasks.registry import due_entries, last_slot, mark_refreshed, next_due, register_table

ANCHOR = time(2, 0)
TOLERANCE = timedelta(minutes=15)
FIRST_NIGHT = datetime(2026, 11, 2, 2, 0, tzinfo=UTC)  # a Monday
# How long each table's refresh takes on each night (seconds), so publishes land anywhere from 1 s to 2 h
# after the start: the case that made a daily table skip every other night.
DURATIONS = {"daily_fast": 1, "daily_slow": 7200, "twice_daily": 95, "weekly": 3600}
FREQUENCY = {"daily_fast": 24, "daily_slow": 24, "twice_daily": 12, "weekly": 168}
LATE_NIGHT, MISSED_NIGHT = 5, 9  # night 5 starts 20 minutes late; night 9's run never happens


@pytest.mark.parametrize(("at", "hours", "slot", "due"), [
    ("2026-11-02T02:00:05", 24, "2026-11-02T02:00", "2026-11-03T02:00"),
    ("2026-11-02T02:01:35", 24, "2026-11-02T02:00", "2026-11-03T02:00"),  # published 95 s after the start
    ("2026-11-02T04:00:01", 24, "2026-11-02T02:00", "2026-11-03T02:00"),  # a 2-hour run
    ("2026-11-02T14:00:00", 24, "2026-11-02T02:00", "2026-11-03T02:00"),  # a manual run in the afternoon
    ("2026-11-03T01:59:00", 24, "2026-11-02T02:00", "2026-11-03T02:00"),  # a 24-hour run still counts for its night
    ("2026-11-02T02:01:35", 12, "2026-11-02T02:00", "2026-11-02T14:00"),
    ("2026-11-02T15:30:00", 12, "2026-11-02T14:00", "2026-11-03T02:00"),
    ("2026-11-02T03:00:00", 168, "2026-11-02T02:00", "2026-11-09T02:00"),  # weekly: same weekday next week
    ("2026-11-02T01:00:00", 24, "2026-11-01T02:00", "2026-11-02T02:00"),  # before the anchor: yesterday's slot
])
def test_next_due_is_the_next_slot(at: str, hours: int, slot: str, due: str) -> None:
    t = datetime.fromisoformat(at).replace(tzinfo=UTC)
    assert last_slot(t, hours, ANCHOR) == datetime.fromisoformat(slot).replace(tzinfo=UTC)
    assert next_due(t, hours, ANCHOR) == datetime.fromisoformat(due).replace(tzinfo=UTC)


def test_fourteen_nights_every_table_runs_on_the_nights_it_should(
    pg: psycopg.Connection[Any], schema: str,
) -> None:
    apply_migrations(pg, schema)
    for name, hours in FREQUENCY.items():
        register_table(pg, schema, name, {"source": name, "key": ["id"], "mode": "full"}, frequency_hours=hours)
    pg.execute(f'UPDATE "{schema}".refresh_config SET next_refresh_at = NULL')  # never refreshed yet

    ran: dict[str, list[int]] = {name: [] for name in FREQUENCY}
    for night in range(1, 15):
        if night == MISSED_NIGHT:
            continue
        start = FIRST_NIGHT + timedelta(days=night - 1, minutes=20 if night == LATE_NIGHT else 0)
        for entry in due_entries(pg, schema, now=start, tolerance=TOLERANCE):
            ran[entry.table_name].append(night)
            mark_refreshed(pg, schema, entry.id, start + timedelta(seconds=DURATIONS[entry.table_name]), ANCHOR)

    every_night = [n for n in range(1, 15) if n != MISSED_NIGHT]
    print("\n".join(f"{name:12} {FREQUENCY[name]:>3} h: nights {nights}" for name, nights in ran.items()))
    assert ran["daily_fast"] == every_night
    assert ran["daily_slow"] == every_night
    assert ran["twice_daily"] == every_night  # a 02:00-only schedule runs a 12-hour table each night
    assert ran["weekly"] == [1, 8]


def test_a_manual_run_before_the_night_does_not_push_the_night_back(pg: psycopg.Connection[Any], schema: str) -> None:
    apply_migrations(pg, schema)
    entry = register_table(pg, schema, "t", {"source": "t", "key": ["id"], "mode": "full"}, frequency_hours=24)
    afternoon = datetime(2026, 11, 2, 14, 0, tzinfo=UTC)
    mark_refreshed(pg, schema, entry.id, afternoon, ANCHOR)
    night = datetime(2026, 11, 3, 2, 0, 3, tzinfo=UTC)
    assert [e.table_name for e in due_entries(pg, schema, now=night - timedelta(minutes=16), tolerance=TOLERANCE)] == []
    assert [e.table_name for e in due_entries(pg, schema, now=night, tolerance=TOLERANCE)] == ["t"]


def test_a_table_waiting_for_its_source_gets_the_wait_on_top_of_its_time_limit() -> None:
    from flows.daily_refresh import _time_limit
    from tasks.registry import RegistryEntry

    def entry(params: dict[str, object]) -> RegistryEntry:
        return RegistryEntry(1, "s", "t", True, 24, 100, None, None, None, None, params)

    base = {"source": "t", "key": ["id"], "mode": "full"}
    assert _time_limit(entry(base), 3600) == 3600
    ready = {**base, "readiness": {"marker_table": "ds.done_{date}", "wait_minutes": 120}}
    assert _time_limit(entry(ready), 3600) == 3600 + 7200
    assert _time_limit(entry({"key": "not a list"}), 3600) == 3600  # invalid: the run itself reports it
