"""The decisions that guard window mode and the reconciliation, as pure functions (no database)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timezone
from datetime import timedelta as td

import pyarrow as pa
import pytest

from tasks.fastpath import LocalSource, local_slices
from tasks.reconcile import SourceSlice, choose_periods, period_text, window_restriction
from tasks.restriction import storage_text

pytestmark = pytest.mark.once

W1, W2, W3 = "2025-01-05", "2025-01-12", "2025-01-19"


@pytest.mark.parametrize(("source", "target", "everything", "read", "vanished"), [
    # nothing changed: nothing read, nothing replaced
    ([SourceSlice(W1, 10, 10, 0), SourceSlice(W2, 10, 10, 0)], {W1: 10, W2: 10}, False, [], []),
    # a changed row in W2: W2 only, read whole
    ([SourceSlice(W1, 10, 10, 0), SourceSlice(W2, 10, 10, 1)], {W1: 10, W2: 10}, False, [W2], []),
    # a silent delete in W1 (no cursor moved): the count differs, W1 read whole
    ([SourceSlice(W1, 9, 9, 0), SourceSlice(W2, 10, 10, 0)], {W1: 10, W2: 10}, False, [W1], []),
    # a new period, and one that vanished
    ([SourceSlice(W2, 10, 10, 0), SourceSlice(W3, 5, 5, 5)], {W1: 10, W2: 10}, False, [W3], [W1]),
    # duplicate keys in the source: distinct keys, not rows, are what the target holds
    ([SourceSlice(W1, 11, 10, 0)], {W1: 10}, False, [], []),
    # a full read replaces every period
    ([SourceSlice(W1, 10, 10, 0), SourceSlice(W2, 10, 10, 0)], {W1: 10, W2: 10}, True, [W1, W2], []),
    # a NULL period is a period too
    ([SourceSlice(None, 3, 3, 1)], {}, False, [None], []),
])
def test_choose_periods(source: list[SourceSlice], target: dict[str | None, int], everything: bool,
                        read: list[str | None], vanished: list[str | None]) -> None:
    choice = choose_periods(source, target, everything=everything)
    assert (choice.read, choice.vanished) == (read, vanished)
    for p in read:
        assert choice.expected[p] == next(s.keys for s in source if s.period == p)
    for p in vanished:
        assert choice.expected[p] == 0


def test_period_text_is_the_same_for_bigquery_and_postgres_values() -> None:
    aware = datetime(2025, 1, 5, 12, 0, tzinfo=UTC)
    assert period_text(aware) == period_text(aware.astimezone(timezone(td(hours=-8))))
    assert period_text(date(2025, 1, 5)) == "2025-01-05"
    assert period_text(7) == "7" and period_text(None) is None


def test_window_restriction_reads_exactly_the_periods() -> None:
    # a restriction is data, rendered for the Storage Read API by tasks/restriction.py's one literal renderer
    assert storage_text(window_restriction([W1, None], "start_date", "DATE")) == \
        "(`start_date` IN (DATE '2025-01-05')) OR (`start_date` IS NULL)"
    assert storage_text(window_restriction([], "start_date", "DATE")) == "FALSE"
    assert storage_text(window_restriction(["it's"], "w", "STRING")) == "`w` IN ('it\\'s')"


def test_local_slices_count_distinct_keys_per_period() -> None:
    t = pa.table({"w": [date(2026, 1, 1)] * 3 + [date(2026, 1, 8)] * 3, "k": ["a", "b", "b", "c", None, "d"]})
    local = LocalSource(t.schema, {"s": lambda offset: iter(t.to_batches(max_chunksize=2))})
    assert sorted(local_slices(local, ["k"], "w"), key=lambda s: str(s.period)) == [
        SourceSlice("2026-01-01", 3, 2, 3), SourceSlice("2026-01-08", 3, 2, 3)]
    assert local_slices(local, ["k"], None) == [SourceSlice(None, 6, 4, 6)]
