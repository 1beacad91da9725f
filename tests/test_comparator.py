"""The independent comparator itself (tests/comparator.py): each rule fails when it should and passes when it should."""

from __future__ import annotations

import ast
import sys
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from dateutil.relativedelta import relativedelta
from psycopg.types.range import Range

from tests import comparator
from tests.comparator import CONVERSIONS, assert_same_rows

KEY = ["id"]
EST = timezone(timedelta(hours=-5))


def compare(source: dict[str, Any], target: dict[str, Any], **options: Any) -> None:
    assert_same_rows([{"id": 1, **source}], [{"id": 1, **target}], KEY, **options)


SAME = [
    pytest.param(None, None, id="NULL"),
    pytest.param(True, True, id="BOOL"),
    pytest.param(7, 7, id="INT64"),
    pytest.param(1.5, 1.5, id="FLOAT64"),
    pytest.param(float("nan"), float("nan"), id="NaN is NaN"),
    pytest.param(-0.0, -0.0, id="-0.0 is -0.0"),
    pytest.param(float("-inf"), float("-inf"), id="-inf"),
    pytest.param(Decimal("1.5"), Decimal("1.500000000"), id="NUMERIC scale padded"),
    pytest.param(Decimal("-0"), Decimal("0E-9"), id="NUMERIC zero"),
    pytest.param("héllo", "héllo", id="STRING"),
    pytest.param(b"\x00\xff", b"\x00\xff", id="BYTES"),
    pytest.param(b"\x00\xff", memoryview(b"\x00\xff"), id="BYTES as memoryview"),
    pytest.param(date(2024, 2, 29), date(2024, 2, 29), id="DATE"),
    pytest.param(datetime(2024, 1, 1, 0, 0, 0, 1), datetime(2024, 1, 1, 0, 0, 0, 1), id="DATETIME"),
    pytest.param(datetime(2024, 1, 1, 12, tzinfo=UTC), datetime(2024, 1, 1, 7, tzinfo=EST), id="TIMESTAMP instant"),
    pytest.param(time(23, 59, 59, 999999), time(23, 59, 59, 999999), id="TIME"),
    pytest.param({"a": 1, "b": [1, {"c": "ü"}]}, {"b": [1, {"c": "ü"}], "a": 1}, id="JSON object"),
    pytest.param("text", "text", id="JSON string"),
    pytest.param([1, 2, 3], [1, 2, 3], id="ARRAY"),
    pytest.param([], [], id="empty ARRAY"),
    pytest.param({"n": Decimal("2.5"), "f": -0.0}, {"n": Decimal("2.50"), "f": -0.0}, id="STRUCT"),
    pytest.param({"n": Decimal("2.5"), "ts": datetime(2024, 1, 1, 12, tzinfo=UTC), "b": b"\x00\xff",
                  "d": date(2024, 2, 29), "dt": datetime(2024, 1, 1, 0, 0, 0, 1), "t": time(1, 2, 3, 4),
                  "a": [Decimal("1")]},
                 {"n": "2.500000000", "ts": "2024-01-01T07:00:00-05:00", "b": "AP8=", "d": "2024-02-29",
                  "dt": "2024-01-01T00:00:00.000001", "t": "01:02:03.000004", "a": ["1.0"]},
                 id="STRUCT members in their JSON text forms"),
    pytest.param({"start": date(2024, 1, 1), "end": None}, Range(date(2024, 1, 1), None, "[)"), id="RANGE unbounded end"),
    pytest.param({"start": None, "end": date(2024, 1, 1)}, Range(None, date(2024, 1, 1), "()"), id="RANGE unbounded start"),
    pytest.param(relativedelta(years=1, months=2, days=-3, hours=4, minutes=5, seconds=6, microseconds=7),
                 "P1Y2M-3DT4H5M6.000007S", id="INTERVAL"),
]

DIFFERENT = [
    pytest.param(Decimal("5"), 5, "Decimal -> Decimal, got int", id="Decimal vs int"),
    pytest.param(5, Decimal("5"), "int -> int, got Decimal", id="int vs Decimal"),
    pytest.param(1.5, Decimal("1.5"), "float -> float, got Decimal", id="float vs Decimal"),
    pytest.param(Decimal("1.5"), 1.5, "Decimal -> Decimal, got float", id="Decimal vs float"),
    pytest.param(-0.0, 0.0, "values differ", id="-0.0 vs 0.0"),
    pytest.param(0.0, -0.0, "values differ", id="0.0 vs -0.0"),
    pytest.param(float("nan"), 1.0, "values differ", id="NaN vs number"),
    pytest.param(1.0, 1, "float -> float, got int", id="float vs int"),
    pytest.param(True, 1, "bool -> bool, got int", id="True vs 1"),
    pytest.param(1, True, "int -> int, got bool", id="1 vs True"),
    pytest.param(Decimal("1.5"), Decimal("1.500000001"), "values differ", id="NUMERIC value"),
    pytest.param(None, 0, "NoneType -> NoneType, got int", id="NULL vs 0"),
    pytest.param("", None, "str -> str, got NoneType", id="empty string vs NULL"),
    pytest.param("5", 5, "str -> str, got int", id="str vs int"),
    pytest.param(b"x", "x", "bytes -> bytes or memoryview, got str", id="bytes vs str"),
    pytest.param(datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 1), "got datetime[naive]", id="aware vs naive"),
    pytest.param(datetime(2024, 1, 1), datetime(2024, 1, 1, tzinfo=UTC), "got datetime[aware]", id="naive vs aware"),
    pytest.param(datetime(2024, 1, 1, 12, tzinfo=UTC), datetime(2024, 1, 1, 12, tzinfo=EST), "values differ",
                 id="TIMESTAMP another instant"),
    pytest.param(date(2024, 1, 1), datetime(2024, 1, 1), "date -> date, got datetime[naive]", id="date vs datetime"),
    pytest.param(time(1, 2), time(1, 2, tzinfo=UTC), "got time[aware]", id="TIME aware"),
    pytest.param({"a": 1}, '{"a": 1}', "dict -> dict, got str", id="JSON object vs its text"),
    pytest.param({"a": 1}, {"a": 1, "b": 2}, "keys extra", id="JSON extra member"),
    pytest.param({"a": 1}, {"a": True}, "['a']: INT64 is int -> int, got bool", id="JSON member type"),
    pytest.param([1, 2], [1, 2, 3], "2 elements, got 3", id="ARRAY length"),
    pytest.param([1, 2], [1, 2.0], "[1]: INT64 is int -> int, got float", id="ARRAY element type"),
    pytest.param([Decimal("1")], [1], "[0]: NUMERIC", id="ARRAY of NUMERIC vs ints"),
    pytest.param({"n": Decimal("2.5")}, {"n": 2.5}, "['n']: NUMERIC", id="STRUCT member type"),
    pytest.param({"n": Decimal("2.5")}, {"n": "2.50001"}, "values differ", id="STRUCT member text value"),
    pytest.param({"b": b"\x00"}, {"b": "AP8="}, "values differ", id="STRUCT BYTES member"),
    pytest.param({"ts": datetime(2024, 1, 1, tzinfo=UTC)}, {"ts": "2024-01-01T00:00:00"}, "reads as datetime[naive]",
                 id="STRUCT TIMESTAMP member without offset"),
    pytest.param([Decimal("1")], ["1"], "[0]: NUMERIC/BIGNUMERIC is Decimal -> Decimal, got str",
                 id="ARRAY of NUMERIC vs text (a PostgreSQL array, not JSON)"),
    pytest.param({"start": date(2024, 1, 1), "end": None}, Range(date(2024, 1, 1), date(2024, 2, 1), "[)"),
                 "unbounded in the source", id="RANGE bounded end"),
    pytest.param({"start": date(2024, 1, 1), "end": date(2024, 2, 1)}, Range(date(2024, 1, 1), date(2024, 2, 1), "[]"),
                 "BigQuery's ranges are [start, end)", id="RANGE inclusive end"),
    pytest.param(relativedelta(months=14), "P1Y1M", "(14, 0, 0) in the source, got (13, 0, 0)", id="INTERVAL months"),
    pytest.param(relativedelta(days=1), "PT24H", "(0, 1, 0) in the source, got (0, 0, 86400000000)",
                 id="INTERVAL a day is not 24 hours"),
]


@pytest.mark.parametrize(("source", "target"), SAME)
def test_the_same_value_of_the_same_type_passes(source: Any, target: Any) -> None:
    compare({"v": source}, {"v": target})


@pytest.mark.parametrize(("source", "target", "reason"), DIFFERENT)
def test_a_different_type_or_value_fails_naming_key_column_values_and_types(source: Any, target: Any,
                                                                            reason: str) -> None:
    with pytest.raises(AssertionError) as failure:
        compare({"v": source}, {"v": target})
    message = str(failure.value)
    assert "key (1,) column 'v'" in message
    assert f"expected {source!r} ({type(source).__name__}" in message
    assert f"got {target!r} ({type(target).__name__}" in message
    assert reason in message


def test_an_extra_target_column_fails_naming_it() -> None:
    with pytest.raises(AssertionError, match="column 'surprise' is in the target but absent from the source"):
        compare({"v": 1}, {"v": 1, "surprise": None})


def test_a_missing_target_column_fails_naming_it() -> None:
    with pytest.raises(AssertionError, match="column 'v' is in the source but absent from the target"):
        compare({"v": 1, "w": 2}, {"w": 2})


@pytest.mark.parametrize(("source", "target"), [({"v": None}, {}), ({}, {"v": None})], ids=["source", "target"])
def test_null_on_one_side_is_not_an_absent_column_on_the_other(source: dict[str, Any], target: dict[str, Any]) -> None:
    with pytest.raises(AssertionError, match="column 'v' is in the .* but absent from the"):
        compare(source, target)


def test_nothing_is_ignored_by_default_and_only_what_is_named() -> None:
    with pytest.raises(AssertionError, match="'_bqr_row_hash' is in the target but absent"):
        compare({"v": 1}, {"v": 1, "_bqr_row_hash": 42})  # a bookkeeping column in the live table is a difference
    with pytest.raises(AssertionError, match="'deleted_at' is in the target but absent"):
        compare({"v": 1}, {"v": 1, "deleted_at": None}, ignore={"other"})
    compare({"v": 1}, {"v": 1, "deleted_at": None}, ignore={"deleted_at"})


def test_an_ignored_name_is_still_required_from_the_source() -> None:
    with pytest.raises(AssertionError, match="'deleted_at' is in the source but absent"):
        compare({"deleted_at": None}, {"deleted_at": None}, ignore={"deleted_at"})


def test_a_rename_maps_source_columns_and_key_to_target_columns() -> None:
    source = [{"asin": "B01", "n": Decimal("1.5")}]
    target = [{"äsin ✓": "B01", "n": Decimal("1.500000000")}]
    assert_same_rows(source, target, ["asin"], rename={"asin": "äsin ✓"})
    with pytest.raises(AssertionError) as failure:  # without the rename: one column absent, one extra
        assert_same_rows(source, target, ["n"])
    assert "'asin' is in the source but absent" in str(failure.value)
    assert "'äsin ✓' is in the target but absent" in str(failure.value)


@pytest.mark.parametrize("side", ["source", "target"])
def test_a_duplicate_key_on_either_side_fails(side: str) -> None:
    once, twice = [{"id": 1, "v": 1}], [{"id": 1, "v": 1}, {"id": 1, "v": 1}]
    with pytest.raises(AssertionError, match=rf"duplicate key \(1,\) in the {side}"):
        assert_same_rows(twice if side == "source" else once, twice if side == "target" else once, KEY)


def test_missing_and_extra_keys_fail() -> None:
    with pytest.raises(AssertionError) as failure:
        assert_same_rows([{"id": 1}, {"id": 2}], [{"id": 2}, {"id": 3}], KEY)
    assert "key (1,) missing from the target" in str(failure.value)
    assert "key (3,) in the target only" in str(failure.value)


def test_a_key_of_another_type_pairs_the_rows_and_then_fails_on_the_key_column() -> None:
    with pytest.raises(AssertionError, match=r"key \(Decimal\('5'\),\) column 'id': expected Decimal\('5'\)"):
        assert_same_rows([{"id": Decimal("5")}], [{"id": 5}], KEY)


def test_many_differences_are_counted_and_the_first_few_shown() -> None:
    source = [{"id": i, "v": Decimal(i)} for i in range(50)]
    target = [{"id": i, "v": i} for i in range(50)]
    with pytest.raises(AssertionError) as failure:
        assert_same_rows(source, target, KEY)
    message = str(failure.value)
    assert message.startswith("50 difference(s) between 50 source and 50 target rows")
    assert "... and 40 more" in message and message.count("column 'v'") == 10


def test_a_long_value_is_shortened_in_the_message() -> None:
    with pytest.raises(AssertionError) as failure:
        compare({"v": "x" * 1_000_000}, {"v": "y" * 1_000_000})
    assert len(str(failure.value)) < 2000 and "(1000002 chars)" in str(failure.value)


def test_a_source_value_without_a_conversion_fails() -> None:
    with pytest.raises(AssertionError, match="no conversion for a source value of type frozenset"):
        compare({"v": frozenset()}, {"v": frozenset()})


def test_identical_rows_in_another_order_pass() -> None:
    rows = [{"id": i, "f": i / 3, "n": Decimal(i) / 7, "ts": datetime(2025, 1, 5, tzinfo=UTC) + timedelta(i)}
            for i in range(20)]
    assert_same_rows(rows, list(reversed([dict(r) for r in rows])), KEY)


def test_the_comparator_imports_the_standard_library_only() -> None:
    tree = ast.parse(Path(comparator.__file__).read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {m.split(".")[0] for m in modules} <= sys.stdlib_module_names | {"__future__"}, modules
    assert set(CONVERSIONS) == {"NoneType", "bool", "int", "float", "Decimal", "str", "bytes", "date",
                                "datetime[naive]", "datetime[aware]", "time[naive]", "list", "dict",
                                "relativedelta"}


def test_as_declared_takes_a_source_value_to_what_a_narrower_declared_column_holds() -> None:
    from tests.comparator import as_declared

    at = datetime(2026, 3, 8, 7, 33, 0, 9, tzinfo=UTC)
    assert as_declared(at, "timestamp without time zone") == datetime(2026, 3, 8, 7, 33, 0, 9)
    assert as_declared(at, "timestamp without time zone", "America/New_York") == datetime(2026, 3, 8, 3, 33, 0, 9)
    assert as_declared(at.replace(hour=6), "timestamp without time zone", "America/New_York") == datetime(2026, 3, 8, 1, 33, 0, 9)
    assert as_declared(0.00005, "numeric(12,4)") == Decimal("0.0001")  # half away from zero, from 15 digits
    assert as_declared(-2.5, "numeric(5,0)") == Decimal("-3")
    assert as_declared(0.1 + 0.2, "numeric(20,16)") == Decimal("0.3000000000000000")  # 15 digits, not 17
    assert as_declared(7, "integer") == 7 and as_declared("x", "character varying(3)") == "x"
    assert comparator.mismatch(as_declared(at, "timestamp without time zone"), datetime(2026, 3, 8, 12, 33, 0, 9)) is not None
