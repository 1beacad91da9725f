"""The independent comparator: source rows (BigQuery client) against target rows (psycopg), strictly.

Nothing here comes from the product (flows/, tasks/, blocks/, bq_refresh/): a test that trusted the product's
own conversions to check the product would prove nothing. Only the standard library is used.

Every value is compared under ``CONVERSIONS``: the Python type the BigQuery client gives for a BigQuery type,
the Python types psycopg may give for the PostgreSQL column the product makes for it, and what "the same"
means for that pair. A value of any other type on the target side is a difference, even when ``==`` would
hold (``Decimal('5') == 5``, ``True == 1``, ``-0.0 == 0.0``). Inside a STRUCT held as jsonb the members go
through ``MEMBER_CONVERSIONS`` (a NUMERIC, TIMESTAMP, BYTES... member is a JSON string that must read back as the
same value); a RANGE (the client's ``{'start', 'end'}``) is compared with psycopg's ``Range``, an INTERVAL (the
client's relativedelta) with PostgreSQL's interval read as text in IntervalStyle iso_8601.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from zoneinfo import ZoneInfo

# The live table is the users' schema: the product keeps no column of its own there (its row hashes live in a side
# table), so by default nothing is ignored and a bookkeeping column in a target is a difference.
SHOWN_DIFFERENCES = 10
SHOWN_CHARS = 160

# (expected, actual, where) -> None when ``actual`` stands for ``expected``, else why not
Same = Callable[[Any, Any, str], str | None]


def kind(value: Any) -> str:
    """The name a value's type has in ``CONVERSIONS``; datetimes and times say whether they are aware.

    The exact type counts, not ``isinstance``: ``bool`` is not an ``int`` and ``datetime`` not a ``date`` here.
    """
    name = type(value).__name__
    if type(value) in (datetime, time):
        return f"{name}[{'naive' if value.utcoffset() is None else 'aware'}]"
    return name


def mismatch(expected: Any, actual: Any, where: str = "", *, table: dict[str, Conversion] | None = None) -> str | None:
    """Why ``actual`` (from psycopg) does not stand for ``expected`` (from the BigQuery client); None if it does.
    ``table``: the conversions in force (``CONVERSIONS``; ``MEMBER_CONVERSIONS`` inside a STRUCT held as jsonb)."""
    if kind(expected) == "dict" and kind(actual) == "Range":  # RANGE: the client's dict, psycopg's Range
        return _same_range(expected, actual, where)
    conversion = (CONVERSIONS if table is None else table).get(kind(expected))
    if conversion is None:
        return f"{where or 'value'}: no conversion for a source value of type {kind(expected)}"
    if kind(actual) not in conversion.target:
        return (f"{where or 'type'}: {conversion.bigquery} is {kind(expected)} -> {' or '.join(conversion.target)},"
                f" got {kind(actual)}")
    return conversion.same(expected, actual, where)


def _scalar(equal: Callable[[Any, Any], bool]) -> Same:
    def same(expected: Any, actual: Any, where: str) -> str | None:
        return None if equal(expected, actual) else (f"{where}: " if where else "") + "values differ"
    return same


def _same_float(expected: float, actual: float) -> bool:
    """Bit for bit up to the NaN payload: the sign of zero counts, NaN is NaN."""
    if math.isnan(expected) or math.isnan(actual):
        return math.isnan(expected) and math.isnan(actual)
    return expected == actual and math.copysign(1.0, expected) == math.copysign(1.0, actual)


def _same_number(expected: Decimal, actual: Decimal) -> bool:
    """Equal as numbers: PostgreSQL numeric(38,9) pads the scale (1.5 comes back as 1.500000000)."""
    if expected.is_nan() or actual.is_nan():
        return expected.is_nan() and actual.is_nan()
    return expected == actual


def _same_list(expected: list[Any], actual: list[Any], where: str, *, members: bool = False) -> str | None:
    if len(expected) != len(actual):
        return f"{where or 'list'}: {len(expected)} elements, got {len(actual)}"
    for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
        reason = mismatch(e, a, f"{where}[{i}]", table=MEMBER_CONVERSIONS if members else None)
        if reason:
            return reason
    return None


def _same_dict(expected: dict[Any, Any], actual: dict[Any, Any], where: str) -> str | None:
    if set(expected) != set(actual):
        return (f"{where or 'object'}: keys missing {sorted(map(repr, set(expected) - set(actual)))},"
                f" keys extra {sorted(map(repr, set(actual) - set(expected)))}")
    for k in expected:
        reason = mismatch(expected[k], actual[k], f"{where}[{k!r}]", table=MEMBER_CONVERSIONS)
        if reason:
            return reason
    return None


def _same_range(expected: dict[Any, Any], actual: Any, where: str) -> str | None:
    """RANGE<T> (the client's {'start', 'end'}) against a PostgreSQL range (psycopg's Range): BigQuery's ranges
    include the start and exclude the end; a NULL bound is unbounded, which PostgreSQL writes as an exclusive
    infinite bound."""
    if set(expected) != {"start", "end"}:
        return f"{where or 'range'}: a range stands for a RANGE's start and end, the source has keys {sorted(expected)}"
    if actual.isempty:
        return f"{where or 'range'}: empty range"
    for bound, value, inclusive in (("start", actual.lower, actual.lower_inc), ("end", actual.upper, actual.upper_inc)):
        e = expected[bound]
        if e is None and value is not None:
            return f"{where}[{bound!r}]: unbounded in the source, got {value!r}"
        if e is not None:
            reason = mismatch(e, value, f"{where}[{bound!r}]")
            if reason:
                return reason
        if inclusive != (bound == "start" and e is not None):
            return f"{where}[{bound!r}]: bounds {actual.bounds!r}, BigQuery's ranges are [start, end)"
    return None


_ISO_INTERVAL = re.compile(r"P(?:(-?\d+)Y)?(?:(-?\d+)M)?(?:(-?\d+)D)?(?:T(?:(-?\d+)H)?(?:(-?\d+)M)?(?:(-?\d+(?:\.\d+)?)S)?)?")


def _same_interval(expected: Any, actual: str, where: str) -> str | None:
    """INTERVAL (the client's dateutil relativedelta) against PostgreSQL's interval read as text in IntervalStyle
    iso_8601 (psycopg's timedelta has no months). Months, days and the time part must each be equal: the two
    types hold the same three parts. The client carries 24 hours or more of a time part into days, so an
    INTERVAL whose time part is 24 hours or more cannot be compared here."""
    m = _ISO_INTERVAL.fullmatch(actual)
    if m is None:
        return f"{where or 'interval'}: {actual!r} is not an ISO 8601 interval (set IntervalStyle to iso_8601)"
    y, mo, d, h, mi = (int(g or 0) for g in m.groups()[:5])
    micros = int(Decimal(m.group(6) or 0) * 1_000_000) + ((h * 60 + mi) * 60) * 1_000_000
    want = (expected.years * 12 + expected.months, expected.days,
            ((expected.hours * 60 + expected.minutes) * 60 + expected.seconds) * 1_000_000 + expected.microseconds)
    got = (y * 12 + mo, d, micros)
    return None if want == got else f"{where or 'interval'}: (months, days, microseconds) {want} in the source, got {got}"


def _same_text_of(parse: Callable[[str], Any]) -> Same:
    """A member of a STRUCT held as jsonb whose type JSON lacks: the product writes it as a JSON string;
    ``parse`` reads that string back (stdlib only) for a comparison of values, not of spellings."""
    def same(expected: Any, actual: Any, where: str) -> str | None:
        if kind(actual) != "str":
            return mismatch(expected, actual, where)
        try:
            value = parse(actual)
        except (ValueError, TypeError, ArithmeticError, binascii.Error):
            return f"{where or 'member'}: {actual!r} does not read as a {kind(expected)}"
        if kind(value) != kind(expected):
            return f"{where or 'member'}: {actual!r} reads as {kind(value)}, the source is {kind(expected)}"
        return None if value == expected else (f"{where}: " if where else "") + "values differ"
    return same


@dataclass(frozen=True)
class Conversion:
    bigquery: str  # the BigQuery type(s) whose client value has this Python type
    target: tuple[str, ...]  # the kinds psycopg may give for the target column
    same: Same


# The source value's kind -> the conversion it must have gone through. JSON values are compared parsed (the
# BigQuery client json.loads them, psycopg loads jsonb the same way), so a JSON string is a str, a JSON object a
# dict; an element of an array or a member of a struct or JSON value goes through this table again.
CONVERSIONS: dict[str, Conversion] = {
    "NoneType": Conversion("NULL", ("NoneType",), _scalar(lambda e, a: True)),
    "bool": Conversion("BOOL", ("bool",), _scalar(lambda e, a: e == a)),
    "int": Conversion("INT64", ("int",), _scalar(lambda e, a: e == a)),
    "float": Conversion("FLOAT64", ("float",), _scalar(_same_float)),
    "Decimal": Conversion("NUMERIC/BIGNUMERIC", ("Decimal",), _scalar(_same_number)),
    "str": Conversion("STRING (or a JSON string)", ("str",), _scalar(lambda e, a: e == a)),
    "bytes": Conversion("BYTES", ("bytes", "memoryview"), _scalar(lambda e, a: e == bytes(a))),
    "date": Conversion("DATE", ("date",), _scalar(lambda e, a: e == a)),
    "datetime[naive]": Conversion("DATETIME", ("datetime[naive]",), _scalar(lambda e, a: e == a)),
    "datetime[aware]": Conversion("TIMESTAMP", ("datetime[aware]",), _scalar(lambda e, a: e == a)),  # instants
    "time[naive]": Conversion("TIME", ("time[naive]",), _scalar(lambda e, a: e == a)),
    "list": Conversion("ARRAY (or a JSON array)", ("list",), _same_list),
    "dict": Conversion("STRUCT (or a JSON object)", ("dict",), _same_dict),
    "relativedelta": Conversion("INTERVAL", ("str",), _same_interval),
}

# Inside a STRUCT (or ARRAY<STRUCT>) held as jsonb, a member whose type JSON has no form for is a JSON string:
# NUMERIC/BIGNUMERIC its exact decimal text, TIMESTAMP and DATETIME ISO 8601 (a TIMESTAMP with its offset),
# DATE and TIME ISO 8601, BYTES base64 (RFC 4648). The typed forms pass too (a jsonb loaded with Decimals).
MEMBER_CONVERSIONS: dict[str, Conversion] = {
    **CONVERSIONS,
    "Decimal": Conversion("NUMERIC/BIGNUMERIC member", ("Decimal", "str"), _same_text_of(Decimal)),
    "bytes": Conversion("BYTES member", ("bytes", "memoryview", "str"),
                        _same_text_of(lambda text: base64.b64decode(text, validate=True))),
    "date": Conversion("DATE member", ("date", "str"), _same_text_of(date.fromisoformat)),
    "datetime[naive]": Conversion("DATETIME member", ("datetime[naive]", "str"), _same_text_of(datetime.fromisoformat)),
    "datetime[aware]": Conversion("TIMESTAMP member", ("datetime[aware]", "str"), _same_text_of(datetime.fromisoformat)),
    "time[naive]": Conversion("TIME member", ("time[naive]", "str"), _same_text_of(time.fromisoformat)),
    "list": Conversion("ARRAY member", ("list",), lambda e, a, where: _same_list(e, a, where, members=True)),
}


def as_declared(value: Any, declared: str, target_timezone: str = "UTC") -> Any:
    """The value a column the users declared narrower than the contract must hold for a source value, by
    PostgreSQL's documented rules, written here from them (not from the product):

    - ``timestamp without time zone`` holds a TIMESTAMP as the wall time in ``target_timezone``;
    - ``numeric(p,s)`` holds a FLOAT64 as PostgreSQL casts a double (its 15 significant digits, DBL_DIG) rounded
      half away from zero to ``s`` places;
    - any other declared type holds the value itself (integer, character varying(n) and numeric(p,s) from
      NUMERIC hold it exactly or the run must fail).
    """
    if declared == "timestamp without time zone" and kind(value) == "datetime[aware]":
        return value.astimezone(ZoneInfo(target_timezone)).replace(tzinfo=None)
    m = re.fullmatch(r"numeric\((\d+),(\d+)\)", declared)
    if m and kind(value) == "float" and math.isfinite(value):
        return Decimal(f"{value:.15g}").quantize(Decimal(1).scaleb(-int(m.group(2))), rounding=ROUND_HALF_UP)
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} chars)"


def _index_key(row: dict[str, Any], key: list[str]) -> tuple[Any, ...]:
    # Rows are paired by key value (Decimal('5') finds 5); the key columns are then compared strictly like the rest.
    return tuple(bytes(row[c]) if isinstance(row[c], memoryview) else row[c] for c in key)


def _index(rows: list[dict[str, Any]], key: list[str], side: str,
           problems: list[str]) -> dict[tuple[Any, ...], dict[str, Any]]:
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        absent = [c for c in key if c not in row]
        if absent:
            problems.append(f"{side} row without key column(s) {absent}: {_show(row)}")
            continue
        k = _index_key(row, key)
        if k in out:
            problems.append(f"duplicate key {k!r} in the {side}")
            continue
        out[k] = row
    return out


def assert_same_rows(expected: list[dict[str, Any]], actual: list[dict[str, Any]], key: list[str], *,
                     rename: Mapping[str, str] | None = None,
                     ignore: Collection[str] = frozenset(),
                     declared: Mapping[str, str] | None = None, target_timezone: str = "UTC") -> None:
    """Assert that the target rows are exactly the source rows: same keys, same columns, same typed values.

    Args:
        expected: source rows as the BigQuery client gives them (or the same Python types, e.g. from Arrow).
        actual: target rows as psycopg gives them.
        key: the key columns, by their source names; each side's keys must be unique.
        rename: source column name -> target column name, for columns the product renames.
        ignore: target columns that stand for nothing in the source: none by default (the live table holds the
            users' columns only); pass e.g. ``{"deleted_at"}`` where a test configures soft deletes. A column of
            the source with an ignored name is still required.
        declared: target column -> the type the users declared it (an adopted table), when narrower than the
            contract: the source value is first taken to what that type holds (``as_declared``).
        target_timezone: the zone of the wall times in ``timestamp without time zone`` columns.

    Raises:
        AssertionError: naming the count of differences and the first few: missing or extra keys, duplicate
            keys, columns on one side only (a NULL on one side is not an absent column on the other), and values
            that differ in type or value under ``CONVERSIONS`` (key, column, both values and both types).
    """
    rename = dict(rename or {})
    target_key = [rename.get(c, c) for c in key]
    problems: list[str] = []
    source = _index(expected, key, "source", problems)
    target = _index(actual, target_key, "target", problems)
    missing = sorted(set(source) - set(target), key=repr)
    extra = sorted(set(target) - set(source), key=repr)
    problems += [f"key {k!r} missing from the target" for k in missing]
    problems += [f"key {k!r} in the target only" for k in extra]

    only_source: dict[str, tuple[tuple[Any, ...], Any]] = {}  # column -> the first key and value it was found on
    only_target: dict[str, tuple[tuple[Any, ...], Any]] = {}
    for k, row in source.items():
        if k not in target:
            continue
        mine = {rename.get(c, c): v for c, v in row.items()}
        theirs = {c: v for c, v in target[k].items() if c not in ignore}
        for column in mine.keys() - theirs.keys():
            only_source.setdefault(column, (k, mine[column]))
        for column in theirs.keys() - mine.keys():
            only_target.setdefault(column, (k, theirs[column]))
        for column in (c for c in mine if c in theirs):
            e, a = mine[column], theirs[column]
            if declared and column in declared:
                e = as_declared(e, declared[column], target_timezone)
            reason = mismatch(e, a)
            if reason:
                problems.append(f"key {k!r} column {column!r}: expected {_show(e)} ({kind(e)}),"
                                f" got {_show(a)} ({kind(a)}): {reason}")
    column_problems = (
        [f"column {c!r} is in the source but absent from the target (first at key {k!r}, source value {_show(v)})"
         for c, (k, v) in sorted(only_source.items())]
        + [f"column {c!r} is in the target but absent from the source (first at key {k!r}, target value {_show(v)});"
           " if it is bookkeeping, pass it in ignore=" for c, (k, v) in sorted(only_target.items())]
    )
    problems = column_problems + problems
    if problems:
        shown = "\n  ".join(problems[:SHOWN_DIFFERENCES])
        more = f"\n  ... and {len(problems) - SHOWN_DIFFERENCES} more" if len(problems) > SHOWN_DIFFERENCES else ""
        raise AssertionError(f"{len(problems)} difference(s) between {len(expected)} source and {len(actual)}"
                             f" target rows:\n  {shown}{more}")
