"""Per-slice row counts and order-independent digests, computed where the data lives (BigQuery SQL and PostgreSQL
SQL), so that only a few numbers per slice cross the wire.

Each row becomes one canonical text, the same on both sides for the same values; its MD5 (native in both
engines) is cut into two 32-bit halves that are summed per slice, as the diff tools do (data-diff, reladiff): the
sums do not depend on row order and cannot overflow a 64-bit integer below 2^31 rows a slice. A column's canonical
text (``CANONICAL`` names the BigQuery functions; each is documented on cloud.google.com/bigquery/docs/reference/
standard-sql, see tests/test_digest.py for the values pinned from those pages):

- INT64: decimal digits.            BOOL: ``true`` / ``false``.      STRING: itself.      BYTES: lowercase hex.
- DATE: ``YYYY-MM-DD`` (BigQuery's CAST to STRING, PostgreSQL's to_char).
- TIMESTAMP: microseconds since the epoch (UTC); a target column declared ``timestamp without time zone`` is
  read as a wall time of the table's ``target_timezone``.
- DATETIME: microseconds since 1970-01-01T00:00:00 of the wall clock.   TIME: microseconds since midnight.
- NUMERIC, BIGNUMERIC: the exact decimal without trailing zeros (``1.5``, ``0``, ``-0.01``): BigQuery's
  CAST(... AS STRING) normalized by a regular expression (a no-op on BigQuery, which already prints it so; the
  emulator pads the scale), PostgreSQL's ``trim_scale``.

A NULL is ``n``; a STRING is its length, ``:`` and its text, any other value its text (which cannot hold ``|``
or be ``n``), so no two rows share a text; values are joined by ``|``. FLOAT64 (text forms differ between
engines), JSON and STRUCT (key order), GEOGRAPHY (WKB vs WKT), INTERVAL, RANGE and ARRAY columns are compared
weaker: their count of non-NULL values per slice.

A slice is a value of the window column (its canonical text) or, for a table without one, one of 256 buckets
of the key (the first two hex digits of the MD5 of the key's canonical text).

This is the one module that counts and digests slices. Its users hand it two ``Side`` s (where a copy's rows
are, and how a query runs there) and get the same answer whichever engines hold them:

- ``bq-refresh verify``: BigQuery (``BigQuerySide``) against the target (``PostgresSide``).
- ``bq-refresh shadow compare``: the live table against the shadow copy, both ``PostgresSide`` (columns from
  ``column_of_pg``: PostgreSQL's own text is exact there, float and JSON included).
- The reconciliation of every run (tasks/reconcile.py): per period of the window column (its own values: a run
  reads and replaces periods by them) the source's rows, distinct keys and changed rows at the read snapshot
  (``bq_period_counts_query``), and the target's rows (``pg_period_counts_query``), inside the publish.
- bench/verify_diff.py: two PostgreSQL tables, against reladiff.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import partial
from typing import Any, Protocol, TypeVar

from psycopg import sql

from tasks.restriction import All, Any_, Cond, Restriction
from tasks.sqlnames import ident

# The weaker comparison: a count of non-NULL values (see the module's docstring).
WEAK_TYPES = frozenset({"FLOAT64", "FLOAT", "JSON", "RECORD", "STRUCT", "GEOGRAPHY", "INTERVAL", "RANGE"})
BUCKET_HEX_DIGITS = 2  # 256 key buckets for a table without a window column
# A column compared between two PostgreSQL copies only (shadow compare): its PostgreSQL text, exact there (float8's
# shortest exact text, jsonb's normalized text, arrays); BigQuery has no such text (bq_text refuses it).
PG_TEXT = "PG_TEXT"
# An array of numeric between two PostgreSQL copies: its dimensions and each element without trailing zeros
# (numeric(12,2)[] holds 1.50 where numeric[] holds 1.5: the same value).
PG_NUMERIC_ARRAY = "PG_NUMERIC_ARRAY"


@dataclass(frozen=True)
class DigestColumn:
    """One synced column as both sides hold it."""

    source_name: str
    target_name: str
    bq_type: str
    repeated: bool = False
    wall_zone: str | None = None  # TIMESTAMP the target declares without time zone: the zone of its wall times

    @property
    def exact(self) -> bool:
        return not self.repeated and self.bq_type.split("<")[0] not in WEAK_TYPES  # RANGE<DATE> is a RANGE


def bq_ident(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def bq_text(c: DigestColumn) -> str:
    """BigQuery SQL: the canonical text of a non-NULL value of ``c``."""
    col = bq_ident(c.source_name)
    t = c.bq_type
    if t in {"INT64", "INTEGER", "BOOL", "BOOLEAN"}:
        return f"CAST({col} AS STRING)"
    if t == "STRING":
        return col
    if t == "BYTES":
        return f"TO_HEX({col})"
    if t == "DATE":
        return f"CAST({col} AS STRING)"
    if t == "TIMESTAMP":
        return f"CAST(UNIX_MICROS({col}) AS STRING)"
    if t == "DATETIME":
        return f"CAST(UNIX_MICROS(TIMESTAMP({col})) AS STRING)"
    if t == "TIME":
        return f"CAST(TIME_DIFF({col}, TIME '00:00:00', MICROSECOND) AS STRING)"
    if t in {"NUMERIC", "BIGNUMERIC", "DECIMAL", "BIGDECIMAL"}:
        return f"REGEXP_REPLACE(REGEXP_REPLACE(CAST({col} AS STRING), r'(\\.[0-9]*?)0+$', r'\\1'), r'\\.$', '')"
    raise ValueError(f"no canonical text for {t}")


def pg_text(c: DigestColumn, alias: str = "t") -> sql.Composable:
    """PostgreSQL: the canonical text of a non-NULL value of ``c`` in the target (as its users declared it)."""
    col: sql.Composable = sql.SQL("{}.{}").format(sql.Identifier(alias), ident(c.target_name))
    t = c.bq_type
    if t in {"INT64", "INTEGER", "BOOL", "BOOLEAN", "STRING", PG_TEXT}:
        return sql.SQL("{}::text").format(col)
    if t == "BYTES":
        return sql.SQL("encode({}, 'hex')").format(col)
    if t == PG_NUMERIC_ARRAY:
        return sql.SQL("coalesce(array_dims({0}), '') || coalesce((SELECT array_agg(trim_scale(e) ORDER BY o)"
                       " FROM unnest({0}) WITH ORDINALITY AS u(e, o))::text, '{{}}')").format(col)
    if t == "DATE":
        return sql.SQL("to_char({}::timestamp, 'YYYY-MM-DD')").format(col)  # not via timestamptz (a zone lookup)
    if t == "TIMESTAMP" and c.wall_zone is not None:
        col = sql.SQL("({} AT TIME ZONE {})").format(col, sql.Literal(c.wall_zone))
    if t in {"TIMESTAMP", "DATETIME", "TIME"}:
        return sql.SQL("(extract(epoch FROM {}) * 1000000)::bigint::text").format(col)
    if t in {"NUMERIC", "BIGNUMERIC", "DECIMAL", "BIGDECIMAL"}:
        return sql.SQL("trim_scale({})::text").format(col)
    raise ValueError(f"no canonical text for {t}")


# Only a STRING's text can hold the separator or look like NULL's ``n``: it alone carries its length (the other
# texts are digits, signs, dots, dashes, hex or true/false; measured: the prefix on every column doubled the cost).
_PREFIXED = frozenset({"STRING", PG_TEXT, PG_NUMERIC_ARRAY})


def bq_row_text(columns: list[DigestColumn]) -> str:
    parts = []
    for c in columns:
        text = bq_text(c)
        value = f"CONCAT(CAST(LENGTH({text}) AS STRING), ':', {text})" if c.bq_type in _PREFIXED else text
        parts.append(f"IF({bq_ident(c.source_name)} IS NULL, 'n', {value})")
    if not parts:
        return "''"
    return "CONCAT(" + ", '|', ".join(parts) + ")" if len(parts) > 1 else parts[0]


def pg_row_text(columns: list[DigestColumn], alias: str = "t") -> sql.Composable:
    parts = []
    for c in columns:
        text = pg_text(c, alias)
        value = sql.SQL("length({}) || ':' || {}").format(text, text) if c.bq_type in _PREFIXED else text
        parts.append(sql.SQL("CASE WHEN {}.{} IS NULL THEN 'n' ELSE {} END").format(
            sql.Identifier(alias), ident(c.target_name), value))
    if not parts:
        return sql.SQL("''")
    # One concat_ws builds the text at once (a chain of || copies it once a column: measured 15-30% of the row
    # digest); no part is NULL, so nothing is skipped. A function takes at most 100 arguments: nested past 90.
    while len(parts) > 1:
        parts = [sql.SQL("concat_ws('|', {})").format(sql.SQL(", ").join(parts[i:i + 90]))
                 for i in range(0, len(parts), 90)]
    return parts[0]


@dataclass(frozen=True)
class Slicing:
    """How rows are cut into slices: by the window column's values, else by key buckets."""

    window: DigestColumn | None
    key: list[DigestColumn]

    def bq(self) -> str:
        if self.window is not None:
            return f"IF({bq_ident(self.window.source_name)} IS NULL, NULL, {bq_text(self.window)})"
        return f"SUBSTR(TO_HEX(MD5({bq_row_text(self.key)})), 1, {BUCKET_HEX_DIGITS})"

    def pg(self, alias: str = "t") -> sql.Composable:
        if self.window is not None:
            return pg_text(self.window, alias)
        return sql.SQL("substr(md5({}), 1, {})").format(pg_row_text(self.key, alias), sql.Literal(BUCKET_HEX_DIGITS))

    @property
    def label(self) -> str:
        return self.window.target_name if self.window is not None else f"key bucket (md5 of the key, {BUCKET_HEX_DIGITS} hex)"


@dataclass(frozen=True)
class SliceDigest:
    """One slice's count and digest on one side (``nonnull``: the weaker columns' non-NULL counts)."""

    slice: str | None
    rows: int
    h1: int
    h2: int
    nonnull: tuple[int, ...] = ()

    @property
    def digest(self) -> str:
        return f"{self.h1:x}.{self.h2:x}" + "".join(f".{n}" for n in self.nonnull)


def bq_query(source_from: str, columns: list[DigestColumn], slicing: Slicing, where: str = "") -> str:
    """One aggregate query over ``source_from`` (a table reference, with FOR SYSTEM_TIME AS OF when it applies):
    per slice the rows, the digest halves' sums and the weaker columns' non-NULL counts."""
    return _bq_aggregate(source_from, columns, slicing, where, 0)


def pg_query(target: sql.Composable, columns: list[DigestColumn], slicing: Slicing,
             where: sql.Composable | None = None) -> sql.Composed:
    return _pg_aggregate(target, columns, slicing, where, 0)


def slice_digests(rows: list[Any]) -> dict[str | None, SliceDigest]:
    """Rows of ``bq_query`` or ``pg_query`` by slice."""
    return {seg.slice: d for seg, d in segment_digests(rows).items()}


@dataclass(frozen=True)
class SliceDifference:
    slice: str | None
    source_rows: int
    target_rows: int
    source_digest: str
    target_digest: str


def differences(source: dict[str | None, SliceDigest], target: dict[str | None, SliceDigest]) -> list[SliceDifference]:
    """The slices whose count or digest differ (a slice on one side only included), in slice order."""
    empty = SliceDigest(None, 0, 0, 0)
    out = []
    for s in sorted(source.keys() | target.keys(), key=lambda v: (v is None, v or "")):
        a, b = source.get(s, empty), target.get(s, empty)
        if (a.rows, a.h1, a.h2, a.nonnull) != (b.rows, b.h1, b.h2, b.nonnull) and (a.rows or b.rows):
            out.append(SliceDifference(s, a.rows, b.rows, a.digest if a.rows else "-", b.digest if b.rows else "-"))
    return out


# Bisection below a differing slice (``locate_rows``): segments of the key hash's hex prefix, 256 children a
# step, down to segments this small, whose rows are then compared one by one (each column's digest only).
ROWS_PER_SEGMENT = 64
MAX_PREFIX = 8


def bq_string(value: str) -> str:
    """A BigQuery string literal."""
    escaped = value.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
    return f"'{escaped}'"


@dataclass(frozen=True)
class Segment:
    """The rows of a slice whose key hash starts with ``prefix`` ('' = the whole slice)."""

    slice: str | None
    prefix: str = ""


def _bq_key_hash(slicing: Slicing) -> str:
    return f"TO_HEX(MD5({bq_row_text(slicing.key)}))"


def _pg_key_hash(slicing: Slicing, alias: str) -> sql.Composable:
    return sql.SQL("md5({})").format(pg_row_text(slicing.key, alias))


_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_INTEGER = re.compile(r"^-?\d+$")


def _bq_native(c: DigestColumn, text: str) -> str | None:
    """A BigQuery literal of the window value whose canonical text is ``text``, for a predicate on the column itself
    (partition pruning and clustering on BigQuery, an index on PostgreSQL); None where there is no simple one."""
    if c.bq_type in {"INT64", "INTEGER"} and _INTEGER.match(text):
        return text
    if c.bq_type == "STRING":
        return bq_string(text)
    if c.bq_type == "DATE" and _DATE.match(text):
        return f"DATE '{text}'"
    if c.bq_type == "TIMESTAMP" and _INTEGER.match(text):
        return f"TIMESTAMP_MICROS({text})"
    if c.bq_type == "DATETIME" and _INTEGER.match(text):
        return f"DATETIME(TIMESTAMP_MICROS({text}))"
    return None


def _pg_native(c: DigestColumn, text: str) -> Any:
    """The Python value psycopg sends for the window value whose canonical text is ``text`` (see _bq_native)."""
    if c.bq_type in {"INT64", "INTEGER"} and _INTEGER.match(text):
        return int(text)
    if c.bq_type == "STRING":
        return text
    if c.bq_type == "DATE" and _DATE.match(text):
        return date.fromisoformat(text)
    if c.bq_type == "TIMESTAMP" and _INTEGER.match(text) and c.wall_zone is None:
        return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=int(text))
    if c.bq_type == "DATETIME" and _INTEGER.match(text):
        return datetime(1970, 1, 1) + timedelta(microseconds=int(text))
    return None


def key_restriction(key: list[DigestColumn], keys: list[list[str | None]]) -> Restriction | None:
    """The rows of exactly these keys (each a list of the key columns' canonical texts), on the columns themselves
    (a Storage Read row restriction, or a query's WHERE with parameters); None where a key value has no simple
    value (the caller then reads more)."""
    parts: list[Restriction] = []
    for values in keys:
        conds: list[Restriction] = []
        for c, text in zip(key, values, strict=True):
            native = None if text is None else _pg_native(c, text)
            if text is not None and native is None:
                return None
            if text is None:
                conds.append(Cond(c.source_name, "IS NULL", c.bq_type))
            else:
                value = native.isoformat() if isinstance(native, date) else str(native)  # datetime is a date
                conds.append(Cond(c.source_name, "=", c.bq_type, (value,)))
        parts.append(All(tuple(conds)))
    return Any_(tuple(parts))


def pg_key_scope(key: list[DigestColumn], keys: list[list[str | None]], alias: str, pg_types: dict[str, str]
                 ) -> sql.Composable | None:
    """SQL: the target rows of these keys (see key_restriction), values bound as literals of the key columns'
    types so the key's index finds them; None where a key value has no simple literal."""
    parts: list[sql.Composable] = []
    for values in keys:
        conds: list[sql.Composable] = []
        for c, text in zip(key, values, strict=True):
            col = sql.SQL("{}.{}").format(sql.Identifier(alias), ident(c.target_name))
            native = None if text is None else _pg_native(c, text)
            if text is not None and native is None:
                return None
            conds.append(sql.SQL("{} IS NULL").format(col) if text is None else
                         sql.SQL("{} = {}::{}").format(col, sql.Literal(native), sql.SQL(pg_types[c.target_name])))
        parts.append(sql.SQL("({})").format(sql.SQL(" AND ").join(conds)))
    return sql.SQL("({})").format(sql.SQL(" OR ").join(parts)) if parts else sql.SQL("false")


def bq_segment_filter(slicing: Slicing, segments: list[Segment]) -> str:
    parts = []
    for seg in segments:
        cond = f"{slicing.bq()} IS NULL" if seg.slice is None else f"{slicing.bq()} = {bq_string(seg.slice)}"
        window = slicing.window
        native = _bq_native(window, seg.slice) if window is not None and seg.slice is not None else None
        if window is not None and native is not None:  # the same rows, found through the column itself
            cond = f"{bq_ident(window.source_name)} = {native} AND {cond}"
        if seg.prefix:
            cond += f" AND STARTS_WITH({_bq_key_hash(slicing)}, '{seg.prefix}')"
        parts.append(f"({cond})")
    return " OR ".join(parts) or "FALSE"


def pg_segment_filter(slicing: Slicing, segments: list[Segment], alias: str = "t") -> sql.Composable:
    parts: list[sql.Composable] = []
    for seg in segments:
        cond: sql.Composable = (sql.SQL("{} IS NULL").format(slicing.pg(alias)) if seg.slice is None
                                else sql.SQL("{} = {}").format(slicing.pg(alias), sql.Literal(seg.slice)))
        native = _pg_native(slicing.window, seg.slice) if slicing.window is not None and seg.slice is not None else None
        if native is not None and slicing.window is not None:  # the same rows, found through the column's index
            cond = sql.SQL("{}.{} = {} AND {}").format(sql.Identifier(alias), ident(slicing.window.target_name),
                                                      sql.Literal(native), cond)
        if seg.prefix:
            cond = sql.SQL("{} AND left({}, {}) = {}").format(cond, _pg_key_hash(slicing, alias),
                                                             sql.Literal(len(seg.prefix)), sql.Literal(seg.prefix))
        parts.append(sql.SQL("({})").format(cond))
    return sql.SQL(" OR ").join(parts) if parts else sql.SQL("false")


def pg_children_query(target: sql.Composable, columns: list[DigestColumn], slicing: Slicing, parents: list[Segment],
                      prefix_len: int, where: sql.Composable | None = None) -> sql.Composed:
    scope = pg_segment_filter(slicing, parents, "t")
    return _pg_aggregate(target, columns, slicing, scope if where is None else sql.SQL("({}) AND {}").format(scope, where),
                         prefix_len)


def _bq_aggregate(source_from: str, columns: list[DigestColumn], slicing: Slicing, where: str, prefix_len: int) -> str:
    """Per (slice, key-hash prefix: '' when ``prefix_len`` is 0) the rows, the digest halves' sums, the weaker
    columns' non-NULL counts."""
    exact = [c for c in columns if c.exact]
    weak = [c for c in columns if not c.exact]
    nonnull = "".join(f", COUNT({bq_ident(c.source_name)}) AS w{i}" for i, c in enumerate(weak))
    weak_cols = "".join(f", {bq_ident(c.source_name)}" for c in weak)
    prefix = f"SUBSTR({_bq_key_hash(slicing)}, 1, {prefix_len})" if prefix_len else "''"
    return (f"SELECT s, p, COUNT(*) AS n, SUM(CAST(CONCAT('0x', SUBSTR(d, 1, 8)) AS INT64)) AS h1,"  # noqa: S608
            f" SUM(CAST(CONCAT('0x', SUBSTR(d, 9, 8)) AS INT64)) AS h2{nonnull}"
            f" FROM (SELECT {slicing.bq()} AS s, {prefix} AS p, TO_HEX(MD5({bq_row_text(exact)})) AS d{weak_cols}"
            f" FROM {source_from}{f' WHERE {where}' if where else ''}) GROUP BY s, p")


def _pg_aggregate(target: sql.Composable, columns: list[DigestColumn], slicing: Slicing,
                  where: sql.Composable | None, prefix_len: int) -> sql.Composed:
    exact = [c for c in columns if c.exact]
    weak = [c for c in columns if not c.exact]
    half = "('x' || substr(d, {}, 8))::bit(32)::bigint"  # 0 to 2^32 - 1, as BigQuery's CAST('0x...' AS INT64)
    prefix = (sql.SQL("left({}, {})").format(_pg_key_hash(slicing, "t"), sql.Literal(prefix_len)) if prefix_len
              else sql.SQL("''"))
    # OFFSET 0 keeps the inner query whole: flattened, PostgreSQL computes the MD5 once for each of its two halves
    # (measured: the slices' digest took twice as long).
    return sql.SQL("SELECT s, p, count(*), sum({}), sum({}){} FROM (SELECT {} AS s, {} AS p, md5({}) AS d{}"
                   " FROM {} t{} OFFSET 0) x GROUP BY s, p").format(
        sql.SQL(half.format(1)), sql.SQL(half.format(9)),
        sql.SQL("").join(sql.SQL(", count({})").format(ident(c.target_name)) for c in weak),
        slicing.pg("t"), prefix, pg_row_text(exact, "t"),
        sql.SQL("").join(sql.SQL(", t.{}").format(ident(c.target_name)) for c in weak),
        target, sql.SQL(" WHERE {}").format(where) if where is not None else sql.SQL(""))


def segment_digests(rows: list[Any]) -> dict[Segment, SliceDigest]:
    """Rows of the aggregate queries (slice, key-hash prefix, rows, sums, non-NULL counts) by segment."""
    out = {}
    for r in rows:
        s = None if r[0] is None else str(r[0])
        out[Segment(s, str(r[1] or ""))] = SliceDigest(s, int(r[2]), int(r[3] or 0), int(r[4] or 0),
                                                       tuple(int(v or 0) for v in r[5:]))
    return out


def _bq_value_digest(c: DigestColumn) -> str:
    if not c.exact:
        return f"IF({bq_ident(c.source_name)} IS NULL, 'n', 'v')"
    return f"TO_HEX(MD5({bq_row_text([c])}))"


def _pg_value_digest(c: DigestColumn, alias: str) -> sql.Composable:
    if not c.exact:
        return sql.SQL("CASE WHEN {}.{} IS NULL THEN 'n' ELSE 'v' END").format(sql.Identifier(alias), ident(c.target_name))
    return sql.SQL("md5({})").format(pg_row_text([c], alias))


def bq_rows_query(source_from: str, columns: list[DigestColumn], slicing: Slicing, segments: list[Segment]) -> str:
    """Per row of ``segments``: the slice, the key's canonical texts, and each column's value digest."""
    keys = ", ".join(f"IF({bq_ident(k.source_name)} IS NULL, NULL, {bq_text(k)})" for k in slicing.key)
    values = ", ".join(_bq_value_digest(c) for c in columns)
    return (f"SELECT {slicing.bq()}, {keys}, {values} FROM {source_from}"  # noqa: S608
            f" WHERE {bq_segment_filter(slicing, segments)}")


def pg_rows_query(target: sql.Composable, columns: list[DigestColumn], slicing: Slicing, segments: list[Segment],
                  where: sql.Composable | None = None) -> sql.Composed:
    keys = sql.SQL(", ").join(sql.SQL("CASE WHEN t.{} IS NULL THEN NULL ELSE {} END").format(
        ident(k.target_name), pg_text(k, "t")) for k in slicing.key)
    scope = pg_segment_filter(slicing, segments, "t")
    if where is not None:
        scope = sql.SQL("({}) AND {}").format(scope, where)
    return sql.SQL("SELECT {}, {}, {} FROM {} t WHERE {}").format(
        slicing.pg("t"), keys, sql.SQL(", ").join(_pg_value_digest(c, "t") for c in columns), target, scope)


@dataclass(frozen=True)
class RowDifference:
    """A row that differs: by key (the key columns' canonical texts), and how."""

    slice: str | None
    key: dict[str, str | None]
    kind: str  # missing (in BigQuery, not here), extra (here only), differs
    columns: list[str]  # the columns whose values differ (kind differs)


def row_differences(columns: list[DigestColumn], slicing: Slicing, source_rows: list[Any],
                    target_rows: list[Any]) -> list[RowDifference]:
    nk = len(slicing.key)
    names = [k.target_name for k in slicing.key]

    def index(rows: list[Any]) -> dict[tuple[Any, ...], tuple[str | None, tuple[Any, ...]]]:
        return {tuple(r[1:1 + nk]): (None if r[0] is None else str(r[0]), tuple(r[1 + nk:])) for r in rows}

    mine, theirs = index(source_rows), index(target_rows)
    out = []
    for key in sorted(mine.keys() | theirs.keys(), key=lambda k: tuple("" if v is None else str(v) for v in k)):
        a, b = mine.get(key), theirs.get(key)
        label = dict(zip(names, key, strict=True))
        if b is None:
            assert a is not None
            out.append(RowDifference(a[0], label, "missing", []))
        elif a is None:
            out.append(RowDifference(b[0], label, "extra", []))
        elif a[1] != b[1]:
            out.append(RowDifference(a[0], label, "differs",
                                     [c.target_name for c, x, y in zip(columns, a[1], b[1], strict=True) if x != y]))
    return out


# --- Two copies compared: where each one's rows are, and the comparison itself ----------------------------------

class Side(Protocol):
    """One copy of a table's rows and where its SQL runs."""

    def slices(self, columns: list[DigestColumn], slicing: Slicing, parents: list[Segment] | None = None,
               prefix_len: int = 0) -> list[Any]:
        """The aggregate rows (slice, key-hash prefix, rows, sums, non-NULL counts) of the rows in ``parents``
        (None: all), per slice and key-hash prefix of ``prefix_len`` hex digits."""
        ...

    def rows(self, columns: list[DigestColumn], slicing: Slicing, segments: list[Segment]) -> list[Any]:
        """Per row of ``segments``: the slice, the key's canonical texts, each column's value digest."""
        ...


@dataclass
class BigQuerySide:
    """Rows in BigQuery: ``source_from`` a table reference (with FOR SYSTEM_TIME AS OF where it applies) or a
    parenthesized query; ``run`` runs one query and returns its rows."""

    source_from: str
    run: Callable[[str], list[Any]]

    def slices(self, columns: list[DigestColumn], slicing: Slicing, parents: list[Segment] | None = None,
               prefix_len: int = 0) -> list[Any]:
        where = bq_segment_filter(slicing, parents) if parents is not None else ""
        return self.run(_bq_aggregate(self.source_from, columns, slicing, where, prefix_len))

    def rows(self, columns: list[DigestColumn], slicing: Slicing, segments: list[Segment]) -> list[Any]:
        return self.run(bq_rows_query(self.source_from, columns, slicing, segments))


@dataclass
class PostgresSide:
    """Rows in PostgreSQL: ``table`` (its rows limited by ``where``, over alias ``t``); ``run`` runs one query."""

    table: sql.Composable
    run: Callable[[sql.Composed], list[Any]]
    where: sql.Composable | None = None

    def slices(self, columns: list[DigestColumn], slicing: Slicing, parents: list[Segment] | None = None,
               prefix_len: int = 0) -> list[Any]:
        if parents is None:
            return self.run(_pg_aggregate(self.table, columns, slicing, self.where, prefix_len))
        return self.run(pg_children_query(self.table, columns, slicing, parents, prefix_len, self.where))

    def rows(self, columns: list[DigestColumn], slicing: Slicing, segments: list[Segment]) -> list[Any]:
        return self.run(pg_rows_query(self.table, columns, slicing, segments, self.where))


A = TypeVar("A")
B = TypeVar("B")


def both(first: Callable[[], A], second: Callable[[], B]) -> tuple[A, B]:
    """Two sides' queries at the same time (each engine scans its own copy: the slower one sets the pace)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="digest-side") as pool:
        a = pool.submit(contextvars.copy_context().run, first)
        b = second()
        return a.result(), b


@dataclass(frozen=True)
class SliceComparison:
    """Both copies' slices and the ones that differ."""

    source: dict[str | None, SliceDigest]
    target: dict[str | None, SliceDigest]
    differing: list[SliceDifference]


def compare_slices(source: Side, target: Side, columns: list[DigestColumn], slicing: Slicing) -> SliceComparison:
    """Each copy's per-slice counts and digests (one aggregate query a side, run at once) and the slices that differ."""
    a, b = both(partial(source.slices, columns, slicing), partial(target.slices, columns, slicing))
    mine, theirs = slice_digests(a), slice_digests(b)
    return SliceComparison(mine, theirs, differences(mine, theirs))


# Bisection bounds: the slices bisected and the rows listed per comparison.
MAX_SLICES_BISECTED = 50
MAX_ROWS_LISTED = 1000


def locate_rows(source: Side, target: Side, columns: list[DigestColumn], slicing: Slicing,
                differing: list[SliceDifference], notes: list[str]) -> list[RowDifference]:
    """Below each differing slice, segments of the key hash (256 children a step) are compared on both sides,
    only the differing ones split further, down to segments of at most ROWS_PER_SEGMENT rows; their rows are then
    compared one by one (a digest per column value), so only digests of the differing places cross. What is left
    out (past MAX_SLICES_BISECTED slices, MAX_ROWS_LISTED rows) is said in ``notes``."""
    if len(differing) > MAX_SLICES_BISECTED:
        notes.append(f"rows listed for the first {MAX_SLICES_BISECTED} of {len(differing)} differing slices")
    pending = [(Segment(d.slice), max(d.source_rows, d.target_rows)) for d in differing[:MAX_SLICES_BISECTED]]
    final: list[Segment] = []
    level = 0
    while pending:
        final += [seg for seg, n in pending if n <= ROWS_PER_SEGMENT or level >= MAX_PREFIX]
        big = [seg for seg, n in pending if n > ROWS_PER_SEGMENT and level < MAX_PREFIX]
        if not big:
            break
        level = min(level + 2, MAX_PREFIX)
        source_rows, target_rows = both(partial(source.slices, columns, slicing, big, level),
                                        partial(target.slices, columns, slicing, big, level))
        a, b = segment_digests(source_rows), segment_digests(target_rows)
        pending = []
        for seg in a.keys() | b.keys():
            x, y = a.get(seg), b.get(seg)
            if x is None or y is None or (x.rows, x.h1, x.h2, x.nonnull) != (y.rows, y.h1, y.h2, y.nonnull):
                pending.append((seg, max(x.rows if x else 0, y.rows if y else 0)))
    if not final:
        return []
    source_rows, target_rows = both(partial(source.rows, columns, slicing, final),
                                    partial(target.rows, columns, slicing, final))
    found = row_differences(columns, slicing, source_rows, target_rows)
    if len(found) > MAX_ROWS_LISTED:
        notes.append(f"the first {MAX_ROWS_LISTED} of {len(found)} differing rows listed")
    return found[:MAX_ROWS_LISTED]


def column_of_pg(name: str, pg_type: str) -> DigestColumn:
    """A column of a table bq-refresh wrote, compared with another PostgreSQL copy of it (shadow compare): the
    canonical text of the BigQuery type it maps from where there is one (whatever its precision or length: numeric
    and numeric(12,2) alike), else PostgreSQL's own text (PG_TEXT: arrays, floats, JSON, ...)."""
    base = re.sub(r"\([^)]*\)", "", pg_type).strip()
    if base.endswith("[]"):
        return DigestColumn(name, name, PG_NUMERIC_ARRAY if base == "numeric[]" else PG_TEXT)
    bq_type = {"bigint": "INT64", "integer": "INT64", "smallint": "INT64", "boolean": "BOOL", "text": "STRING",
               "character varying": "STRING", "bytea": "BYTES", "date": "DATE", "numeric": "NUMERIC",
               "timestamp with time zone": "TIMESTAMP", "timestamp without time zone": "DATETIME",
               "time without time zone": "TIME"}.get(base, PG_TEXT)
    return DigestColumn(name, name, bq_type)


# --- The reconciliation's counts: per period of the window column (its own values), or for the whole table -------

def bq_period_counts_query(source_from: str, *, key: list[str], window: str | None, changed: str | None = None,
                           where: str | None = None) -> str:
    """BigQuery: per value of ``window`` (NULL for the whole table when there is none) the rows, the distinct keys
    without a NULL (the rows the target must hold), and the rows matching ``changed`` (ours, from typed literals).

    Args:
        source_from: a table reference (with FOR SYSTEM_TIME AS OF where it applies).
        key, window: source column names.
        where: a BigQuery boolean expression (ours) restricting the rows counted (a repair's keys).
    """
    any_null = " OR ".join(f"{bq_ident(k)} IS NULL" for k in key)
    struct = ", ".join(bq_ident(k) for k in key)
    select = (f"COUNT(*) AS n, COUNT(DISTINCT IF({any_null}, NULL, TO_JSON_STRING(STRUCT({struct})))) AS k,"
              f" {f'COUNTIF({changed})' if changed else '0'} AS c")
    src = source_from + (f" WHERE {where}" if where else "")
    if window:
        return f"SELECT {bq_ident(window)} AS w, {select} FROM {src} GROUP BY 1"  # noqa: S608
    return f"SELECT NULL AS w, {select} FROM {src}"  # noqa: S608


def pg_period_counts_query(target: sql.Composable, *, window: str | None, scope: sql.Composable | None = None,
                           live_only: str | None = None) -> sql.Composed:
    """PostgreSQL: per value of ``window`` (one row for all when None) the rows of ``target`` (alias ``t``) in
    ``scope``, soft-deleted rows (``live_only`` set) left out."""
    conds: list[sql.Composable] = [] if scope is None else [sql.SQL("({})").format(scope)]
    if live_only:
        conds.append(sql.SQL("t.{} IS NULL").format(ident(live_only)))
    where = sql.SQL(" WHERE {}").format(sql.SQL(" AND ").join(conds)) if conds else sql.SQL("")
    if window:
        return sql.SQL("SELECT t.{}, count(*) FROM {} t{} GROUP BY 1").format(ident(window), target, where)
    return sql.SQL("SELECT NULL, count(*) FROM {} t{}").format(target, where)
