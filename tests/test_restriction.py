"""Row restrictions as data (tasks/restriction.py): the one literal renderer pinned by hand-written golden texts,
values that are not of their type refused (never pasted into SQL), the same restriction as query parameters, and
a checkpoint's copy read back only when it is a restriction this module writes."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from tasks import restriction as rs
from tasks.restriction import All, Any_, Cond

pytestmark = pytest.mark.once  # no database


@pytest.mark.parametrize(("text", "bq_type", "literal"), [
    ("42", "INT64", "42"),
    ("-9223372036854775808", "INTEGER", "-9223372036854775808"),
    ("2025-01-05", "DATE", "DATE '2025-01-05'"),
    ("2025-01-05T10:00:00+02:00", "TIMESTAMP", "TIMESTAMP '2025-01-05T08:00:00+00:00'"),
    ("2025-01-05T10:00:00", "TIMESTAMP", "TIMESTAMP '2025-01-05T10:00:00+00:00'"),
    ("2025-01-05T10:00:00.000001", "DATETIME", "DATETIME '2025-01-05T10:00:00.000001'"),
    ("19.990000001", "NUMERIC", "NUMERIC '19.990000001'"),
    ("True", "BOOL", "TRUE"),
    ("12:34:56.000001", "TIME", "TIME '12:34:56.000001'"),
    ("-0.000000001", "NUMERIC", "NUMERIC '-1E-9'"),
    ("it's a \\ test\n", "STRING", "'it\\'s a \\\\ test\\n'"),
])
def test_each_value_has_one_literal(text: str, bq_type: str, literal: str) -> None:
    assert rs.literal(text, bq_type) == literal


@pytest.mark.parametrize(("text", "bq_type"), [
    ("1 OR TRUE", "INT64"), ("2025-01-05' OR TRUE --", "DATE"), ("x", "TIMESTAMP"), ("2025-01-05T10:00:00+01:00", "DATETIME"),
    ("NaN", "NUMERIC"), ("1; DROP", "NUMERIC"), ("yes", "BOOL"), ("9223372036854775808", "INT64"),
    ("0.0000000001", "NUMERIC"), ("25:00", "TIME"),
])
def test_a_value_that_is_not_of_its_type_is_refused(text: str, bq_type: str) -> None:
    with pytest.raises(ValueError, match="is not a"):
        rs.literal(text, bq_type)
    with pytest.raises(ValueError, match="is not a"):
        Cond("c", "=", bq_type, (text,))


def test_a_restriction_renders_for_the_storage_api_and_as_a_parameterized_query() -> None:
    r = All((Any_((Cond("start_date", "IN", "DATE", ("2025-01-05", "2025-01-12")), Cond("start_date", "IS NULL", "DATE"))),
             Cond("up`dated", ">=", "TIMESTAMP", ("2025-01-01T00:00:00+00:00",))))
    assert rs.storage_text(r) == ("((`start_date` IN (DATE '2025-01-05', DATE '2025-01-12')) OR (`start_date` IS NULL))"
                                  " AND (`up\\`dated` >= TIMESTAMP '2025-01-01T00:00:00+00:00')")
    where, params = rs.query_where(r, "c")
    assert where == "((`start_date` IN UNNEST(@c0)) OR (`start_date` IS NULL)) AND (`up\\`dated` >= @c1)"
    assert [(p.name, p.array_type if hasattr(p, "array_type") else p.type_) for p in params] == [("c0", "DATE"),
                                                                                                  ("c1", "TIMESTAMP")]
    assert params[0].values == [date(2025, 1, 5), date(2025, 1, 12)]
    assert params[1].value == datetime(2025, 1, 1, tzinfo=UTC)
    assert rs.storage_text(rs.EVERY_ROW) == "" and rs.query_where(rs.EVERY_ROW) == ("TRUE", [])
    assert rs.storage_text(rs.NO_ROW) == "FALSE"
    assert rs.storage_text(Cond("_partitiontime", "IS NULL", "TIMESTAMP")) == "_PARTITIONTIME IS NULL"
    assert rs.python_value("1.50", "NUMERIC") == Decimal("1.50")


def test_a_checkpoints_restriction_is_read_back_only_as_data() -> None:
    r = Any_((All((Cond("asin", "=", "STRING", ("B0')",)), Cond("n", "IS NULL", "INT64"))),))
    assert rs.from_json(rs.to_json(r)) == r
    for bad in ("`a` >= 1) OR (TRUE", {"column": "a", "op": ">= 1 OR TRUE --", "type": "INT64", "values": ["1"]},
                {"column": "a", "op": "=", "type": "INT64", "values": ["1) OR (TRUE"]},
                {"column": "a", "op": "=", "type": "JSON", "values": ["{}"]},
                {"column": "a", "op": "=", "type": "INT64", "values": [1]},
                {"column": "a", "op": "=", "type": "INT64", "values": ["1"], "sql": "TRUE"},
                {"all": "TRUE"}):
        with pytest.raises(ValueError, match="row restriction"):
            rs.from_json(bad)


def test_a_checkpoint_is_resumed_only_when_its_restriction_reads_back_as_data() -> None:
    from tasks.refresh_plan import _restriction_unreadable

    assert _restriction_unreadable({"restriction": rs.to_json(Cond("w", "IN", "DATE", ("2025-01-05",)))}) is None
    assert "SQL text" in str(_restriction_unreadable({"row_restriction": "`w` >= 1"}))
    forged = {"restriction": {"column": "w", "op": ">=", "type": "INT64", "values": ["1) OR (TRUE"]}}
    assert "not one this version writes" in str(_restriction_unreadable(forged))
