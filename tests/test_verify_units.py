"""Verify's decisions that need no database: which BigQuery snapshot it reads, across the dataset's time travel
window (https://cloud.google.com/bigquery/docs/time-travel: a table can be read as of any time inside the window,
max_time_travel_hours, 48 to 168 hours; older is refused)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tasks.verify import read_as_of

pytestmark = pytest.mark.once

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def never() -> int:
    raise AssertionError("the dataset's window is asked for only past the shortest window")


@pytest.mark.parametrize(("age_hours", "window", "reads_as_of"), [
    (1, None, True),  # a night ago: no need to ask the dataset
    (46.9, None, True),  # just inside the shortest window less the 1 h margin
    (47.1, 48, False),  # past it, with the dataset at 48 h: read as it is now
    (47.1, 168, True),  # the same snapshot with the default 7 days: still served
    (166.9, 168, True),
    (167.1, 168, False),
])
def test_the_snapshot_read_moves_with_the_datasets_time_travel_window(age_hours: float, window: int | None,
                                                                      reads_as_of: bool) -> None:
    snapshot = NOW - timedelta(hours=age_hours)
    asked: list[int] = []

    def hours() -> int:
        assert window is not None, "asked for the window inside the shortest one"
        asked.append(window)
        return window

    at, note = read_as_of(snapshot, NOW, time_travel=True, window_hours=hours)
    assert (at == snapshot) is reads_as_of
    assert asked == ([] if window is None else [window])
    if reads_as_of:
        assert note is None
    else:
        assert at is None and note is not None
        assert f"max_time_travel_hours is {window}" in note and "read as it is now" in note


def test_no_snapshot_or_no_time_travel_reads_the_table_as_it_is_now() -> None:
    assert read_as_of(None, NOW, time_travel=True, window_hours=never) == (
        None, "no successful run recorded its read snapshot: BigQuery read as it is now")
    at, note = read_as_of(NOW - timedelta(hours=1), NOW, time_travel=False, window_hours=never)
    assert at is None and note is not None and "no time travel" in note
