"""Row restrictions as data: which rows a run reads, kept as (column, operator, type, values) and rendered only
where they are used, two ways:

- ``storage_text``: a Storage Read API ``row_restriction``, which takes no parameters, so the values become
  literals, each through ``literal`` (the one renderer, parsing the value as its type first: a value that is not
  one is refused, never pasted).
- ``query_where``: the WHERE of a BigQuery query with the values as bound query parameters
  (cloud.google.com/bigquery/docs/parameterized-queries): the count queries of the reconciliation and the gate.

A run's checkpoint keeps the restriction as this data (``to_json`` / ``from_json``, which validates every part),
so a resumed run never reads SQL text back from the database.

Values are texts: INT64 decimal digits (in its range), DATE ``YYYY-MM-DD``, TIME, TIMESTAMP and DATETIME ISO 8601
(a TIMESTAMP's with its offset, or UTC), NUMERIC/BIGNUMERIC a decimal of at most 9/38 digits after the point, BOOL
``true``/``false``, STRING itself. Other types (FLOAT64, BYTES, ...) have no literal here: a restriction on one is
refused when it is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import Decimal, InvalidOperation
from typing import Any

OPERATORS = ("=", ">=", "IN", "IS NULL")
TYPES = ("INT64", "STRING", "DATE", "DATETIME", "TIME", "TIMESTAMP", "NUMERIC", "BIGNUMERIC", "BOOL")
_INT64 = (-(2**63), 2**63 - 1)
_SCALE = {"NUMERIC": 9, "BIGNUMERIC": 38}  # the most digits after the point BigQuery keeps
_ALIASES = {"INTEGER": "INT64", "BOOLEAN": "BOOL", "DECIMAL": "NUMERIC", "BIGDECIMAL": "BIGNUMERIC"}
PSEUDO_COLUMNS = ("_PARTITIONTIME", "_PARTITIONDATE")  # written bare, as BigQuery's documentation writes them


@dataclass(frozen=True)
class Cond:
    """``column op values``: ``=`` and ``>=`` take one value, ``IN`` one or more, ``IS NULL`` none."""

    column: str
    op: str
    bq_type: str
    values: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.op not in OPERATORS:
            raise ValueError(f"row restriction: operator {self.op!r} is not one of {', '.join(OPERATORS)}")
        if bq_type(self.bq_type) not in TYPES:
            raise ValueError(f"row restriction on {self.column}: type {self.bq_type} has no literal here")
        wanted = {"=": 1, ">=": 1, "IS NULL": 0}.get(self.op)
        if (wanted is not None and len(self.values) != wanted) or (self.op == "IN" and not self.values):
            raise ValueError(f"row restriction on {self.column}: {self.op} with {len(self.values)} value(s)")
        for v in self.values:
            literal(v, self.bq_type)  # refused here, when it is made or read back, not when it is sent


@dataclass(frozen=True)
class All:
    """Every part holds (no part: every row)."""

    parts: tuple[Restriction, ...] = ()


@dataclass(frozen=True)
class Any_:
    """Some part holds (no part: no row)."""

    parts: tuple[Restriction, ...] = ()


Restriction = Cond | All | Any_
EVERY_ROW = All()
NO_ROW = Any_()


def bq_type(name: str) -> str:
    return _ALIASES.get(name.upper(), name.upper())


def any_of(parts: list[Restriction]) -> Restriction:
    return parts[0] if len(parts) == 1 else Any_(tuple(parts))


def ident(name: str) -> str:
    """A BigQuery column name, quoted (a pseudo-column bare)."""
    if name.upper() in PSEUDO_COLUMNS:
        return name.upper()
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def python_value(text: str, type_name: str) -> Any:
    """The value of ``text`` as its type's Python value (what a query parameter carries).

    Raises:
        ValueError: ``text`` is not a value of the type (named with the type).
    """
    t = bq_type(type_name)
    try:
        if t == "INT64":
            if not text.lstrip("-").isdigit() or not _INT64[0] <= int(text) <= _INT64[1]:
                raise ValueError(text)
            return int(text)
        if t == "DATE":
            return date.fromisoformat(text)
        if t == "TIMESTAMP":
            at = datetime.fromisoformat(text)
            return at.replace(tzinfo=UTC) if at.tzinfo is None else at
        if t == "TIME":
            return time.fromisoformat(text)
        if t == "DATETIME":
            at = datetime.fromisoformat(text)
            if at.tzinfo is not None:
                raise ValueError(text)
            return at
        if t in {"NUMERIC", "BIGNUMERIC"}:
            number = Decimal(text)
            if not number.is_finite() or -number.as_tuple().exponent > _SCALE[t]:  # type: ignore[operator]
                raise ValueError(text)
            return number
        if t == "BOOL":
            return {"true": True, "false": False}[text.lower()]
        if t == "STRING":
            return text
    except (ValueError, KeyError, InvalidOperation):
        raise ValueError(f"row restriction: {text!r} is not a {t} value") from None
    raise ValueError(f"row restriction: type {t} has no literal here")


def literal(text: str, type_name: str) -> str:
    """The BigQuery literal of a value (for the Storage Read API, which takes no parameters).

    Raises:
        ValueError: ``text`` is not a value of the type.
    """
    t = bq_type(type_name)
    value = python_value(text, t)
    if t == "INT64":
        return str(value)
    if t == "BOOL":
        return "TRUE" if value else "FALSE"
    if t == "STRING":
        escaped = (value.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
                   .replace("\0", "\\x00"))
        return f"'{escaped}'"
    if t == "TIMESTAMP":
        return f"TIMESTAMP '{value.astimezone(UTC).isoformat()}'"
    if t in {"NUMERIC", "BIGNUMERIC"}:
        return f"{t} '{value}'"
    return f"{t} '{value.isoformat()}'"  # DATE, DATETIME


def storage_text(r: Restriction) -> str:
    """The Storage Read API ``row_restriction`` ('' for every row)."""
    if r == EVERY_ROW:
        return ""
    return _render(r, lambda text, t: literal(text, t), lambda texts, t: ", ".join(literal(v, t) for v in texts))


def query_where(r: Restriction, prefix: str = "r") -> tuple[str, list[Any]]:
    """A query's boolean expression ('TRUE' for every row) and its query parameters (named ``prefix`` + a number)."""
    from google.cloud import bigquery

    params: list[Any] = []

    def one(text: str, t: str) -> str:
        params.append(bigquery.ScalarQueryParameter(f"{prefix}{len(params)}", bq_type(t), python_value(text, t)))
        return f"@{prefix}{len(params) - 1}"

    def many(texts: tuple[str, ...], t: str) -> str:
        params.append(bigquery.ArrayQueryParameter(f"{prefix}{len(params)}", bq_type(t),
                                                   [python_value(v, t) for v in texts]))
        return f"UNNEST(@{prefix}{len(params) - 1})"

    if r == EVERY_ROW:
        return "TRUE", []
    return _render(r, one, many, unnest=True), params


def _render(r: Restriction, one: Any, many: Any, *, unnest: bool = False) -> str:
    if isinstance(r, Cond):
        col = ident(r.column)
        if r.op == "IS NULL":
            return f"{col} IS NULL"
        if r.op == "IN":
            return f"{col} IN {many(r.values, r.bq_type)}" if unnest else f"{col} IN ({many(r.values, r.bq_type)})"
        return f"{col} {r.op} {one(r.values[0], r.bq_type)}"
    if not r.parts:
        return "TRUE" if isinstance(r, All) else "FALSE"
    joiner = " AND " if isinstance(r, All) else " OR "
    return joiner.join(f"({_render(p, one, many, unnest=unnest)})" for p in r.parts)


def to_json(r: Restriction) -> dict[str, Any]:
    if isinstance(r, Cond):
        return {"column": r.column, "op": r.op, "type": r.bq_type, "values": list(r.values)}
    return {"all" if isinstance(r, All) else "any": [to_json(p) for p in r.parts]}


def from_json(data: Any) -> Restriction:
    """A restriction read back (a checkpoint): every part checked as when it was made.

    Raises:
        ValueError: anything that is not a restriction this module writes.
    """
    if not isinstance(data, dict):
        raise ValueError("row restriction: not an object")
    if set(data) == {"all"} or set(data) == {"any"}:
        parts = data.get("all", data.get("any"))
        if not isinstance(parts, list):
            raise ValueError("row restriction: parts are not a list")
        kids = tuple(from_json(p) for p in parts)
        return All(kids) if "all" in data else Any_(kids)
    if set(data) != {"column", "op", "type", "values"} or not isinstance(data["column"], str):
        raise ValueError("row restriction: not a condition")
    values = data["values"]
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError("row restriction: values are not texts")
    return Cond(data["column"], str(data["op"]), str(data["type"]), tuple(values))
