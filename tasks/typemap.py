"""The BigQuery -> PostgreSQL type contract, for DDL and for the Arrow data on its way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from bq_refresh.errors import SourceError
from tasks.geography import wkb_array_to_wkt

SCALAR_PG = {
    "INT64": "bigint", "INTEGER": "bigint",
    "FLOAT64": "double precision", "FLOAT": "double precision",
    "NUMERIC": "numeric(38,9)", "BIGNUMERIC": "numeric", "BIGDECIMAL": "numeric",
    "BOOL": "boolean", "BOOLEAN": "boolean",
    "STRING": "text", "BYTES": "bytea",
    "DATE": "date", "DATETIME": "timestamp", "TIMESTAMP": "timestamptz", "TIME": "time",
    "JSON": "jsonb", "RECORD": "jsonb", "STRUCT": "jsonb",
    "GEOGRAPHY": "text", "INTERVAL": "interval",
    # RANGE<T> as BigQuery spells it with its element type (source_type); NULL bounds are unbounded.
    "RANGE<DATE>": "daterange", "RANGE<DATETIME>": "tsrange", "RANGE<TIMESTAMP>": "tstzrange",
}
SCALAR_ARROW: dict[str, pa.DataType] = {
    "INT64": pa.int64(), "INTEGER": pa.int64(),
    "FLOAT64": pa.float64(), "FLOAT": pa.float64(),
    "NUMERIC": pa.decimal128(38, 9), "BIGNUMERIC": pa.decimal256(76, 38), "BIGDECIMAL": pa.decimal256(76, 38),
    "BOOL": pa.bool_(), "BOOLEAN": pa.bool_(),
    "STRING": pa.string(), "BYTES": pa.binary(),
    "DATE": pa.date32(), "DATETIME": pa.timestamp("us"), "TIMESTAMP": pa.timestamp("us", tz="UTC"),
    "TIME": pa.time64("us"), "JSON": pa.string(), "RECORD": pa.string(), "STRUCT": pa.string(),
    "GEOGRAPHY": pa.string(), "INTERVAL": pa.string(),
    "RANGE<DATE>": pa.string(), "RANGE<DATETIME>": pa.string(), "RANGE<TIMESTAMP>": pa.string(),
}
# The Arrow element type of a RANGE's start and end, as the Storage Read API sends them.
RANGE_ELEMENT_ARROW: dict[str, pa.DataType] = {
    "DATE": pa.date32(), "DATETIME": pa.timestamp("us"), "TIMESTAMP": pa.timestamp("us", tz="UTC"),
}
CURSOR_TYPES = {"TIMESTAMP", "DATETIME", "DATE", "INT64", "INTEGER"}


# How PostgreSQL's format_type() spells the contract's types (to tell a table made by bq-refresh from one whose
# columns were declared otherwise).
_FORMATTED = {"timestamp": "timestamp without time zone", "timestamptz": "timestamp with time zone",
              "time": "time without time zone"}


def declared_form(pg_type: str) -> str:
    """The contract's type as format_type() writes it (``timestamptz[]`` -> ``timestamp with time zone[]``)."""
    base, array = (pg_type[:-2], "[]") if pg_type.endswith("[]") else (pg_type, "")
    return _FORMATTED.get(base, base) + array


@dataclass(frozen=True)
class Column:
    """One synced column: its source field and where and how it lands."""

    source_name: str
    target_name: str
    bq_type: str
    mode: str  # NULLABLE, REQUIRED, REPEATED
    derived: bool = False  # computed by a transform, not read from the source

    @property
    def is_json(self) -> bool:
        return self.bq_type in {"JSON", "RECORD", "STRUCT"} or (self.mode == "REPEATED" and self.bq_type in {"RECORD", "STRUCT"})

    @property
    def pg_type(self) -> str:
        """The column's type in the live table."""
        if self.mode == "REPEATED" and self.bq_type in {"RECORD", "STRUCT", "JSON"}:
            return "jsonb"
        base = SCALAR_PG.get(self.bq_type)
        if base is None:
            raise SourceError(f"column {self.source_name!r} has unsupported BigQuery type {self.bq_type}")
        return base + "[]" if self.mode == "REPEATED" else base

    @property
    def staging_type(self) -> str:
        """The column's type in staging: JSON, INTERVAL and RANGE travel as their text forms (binary COPY writes
        none of jsonb, interval or the range types from Arrow); the publish casts them."""
        if self.pg_type == "jsonb":
            return "text"
        if self.bq_type == "INTERVAL" or self.bq_type.startswith("RANGE<"):
            return "text"
        return self.pg_type

    @property
    def arrow_type(self) -> pa.DataType:
        if self.is_json or self.pg_type == "jsonb":
            return pa.string()
        base = SCALAR_ARROW[self.bq_type]
        return pa.list_(base) if self.mode == "REPEATED" else base

    def describe(self) -> dict[str, str]:
        return {"name": self.source_name, "type": self.bq_type, "mode": self.mode}


def normalize_type(field_type: str) -> str:
    return {"INTEGER": "INT64", "FLOAT": "FLOAT64", "BOOLEAN": "BOOL", "STRUCT": "RECORD", "BIGDECIMAL": "BIGNUMERIC"}.get(
        field_type.upper(), field_type.upper()
    )


def source_type(field_type: str, range_element_type: Any = None) -> str:
    """The contract's name for a BigQuery column type: normalized, and a RANGE with its element type
    (``RANGE<DATE>``), which decides the PostgreSQL range type.

    Args:
        field_type: ``SchemaField.field_type``.
        range_element_type: ``SchemaField.range_element_type`` (a FieldElementType or its type name), for RANGE.
    """
    t = normalize_type(field_type)
    if t == "RANGE":
        element = getattr(range_element_type, "element_type", range_element_type)
        return f"RANGE<{str(element).upper()}>" if element else t
    return t


# The extension names BigQuery's Storage Read API (and google-cloud-bigquery's to_arrow) put on a field whose
# Arrow type alone does not say its BigQuery type; the emulator marks its WKB GEOGRAPHY as geoarrow.wkb.
_EXTENSION_TYPES = {b"google:sqlType:geography": "GEOGRAPHY", b"google:sqlType:json": "JSON",
                    b"google:sqlType:datetime": "DATETIME", b"google:sqlType:interval": "INTERVAL",
                    b"google:sqlType:range": "RANGE", b"geoarrow.wkb": "GEOGRAPHY", b"geoarrow.wkt": "GEOGRAPHY"}


def _arrow_scalar_type(t: pa.DataType, metadata: dict[bytes, bytes]) -> str | None:
    named = _EXTENSION_TYPES.get(metadata.get(b"ARROW:extension:name", b""))
    if metadata.get(b"google:sqlType", b"").lower() == b"range":
        named = "RANGE"
    if pa.types.is_struct(t):
        names = [t.field(i).name for i in range(t.num_fields)]
        element = next((bq for bq, arrow in RANGE_ELEMENT_ARROW.items() if arrow == t.field(0).type), None)
        if named == "RANGE" and names == ["start", "end"] and t.field(1).type == t.field(0).type and element:
            return f"RANGE<{element}>"
        return "RECORD"
    if named is not None and named != "RANGE":
        return named
    if pa.types.is_timestamp(t):
        return "TIMESTAMP" if t.tz else "DATETIME"
    if pa.types.is_decimal(t):
        return "BIGNUMERIC" if pa.types.is_decimal256(t) else "NUMERIC"
    tests = [(pa.types.is_boolean, "BOOL"), (pa.types.is_integer, "INT64"), (pa.types.is_floating, "FLOAT64"),
             (pa.types.is_date, "DATE"), (pa.types.is_time, "TIME"), (pa.types.is_string, "STRING"),
             (pa.types.is_large_string, "STRING"), (pa.types.is_binary, "BYTES"), (pa.types.is_large_binary, "BYTES")]
    for test, bq in tests:
        if test(t):
            return bq
    if t == pa.month_day_nano_interval():
        return "INTERVAL"
    return None


def arrow_source_type(field: pa.Field) -> tuple[str, str] | None:
    """The BigQuery type and mode an Arrow field of a read session stands for (in-process batches carry no
    BigQuery schema): by its Arrow type and the extension metadata BigQuery sets. A REPEATED column is a
    list whose element type comes from the list's item and whose metadata sits on the list field, as BigQuery
    sends it. None: no BigQuery type has this Arrow form."""
    metadata = dict(field.metadata or {})
    if pa.types.is_list(field.type) or pa.types.is_large_list(field.type):
        item = field.type.value_field
        element = _arrow_scalar_type(item.type, {**dict(item.metadata or {}), **metadata})
        return None if element is None else (element, "REPEATED")
    bq = _arrow_scalar_type(field.type, metadata)
    return None if bq is None else (bq, "NULLABLE" if field.nullable else "REQUIRED")


def _json_text(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    import json
    from decimal import Decimal

    def default(value: Any) -> Any:
        if isinstance(value, Decimal):
            return str(value)
        if isinstance(value, bytes):
            import base64

            return base64.b64encode(value).decode()
        return value.isoformat() if hasattr(value, "isoformat") else str(value)

    def intervals(value: Any) -> Any:
        # An INTERVAL member arrives as a MonthDayNano, a named tuple json would write as a bare array: written as
        # ISO 8601 instead, its three parts kept (P14M3DT14706.789S; PostgreSQL reads it back as the interval).
        if isinstance(value, pa.MonthDayNano):
            seconds = Decimal(value.nanoseconds).scaleb(-9).normalize()
            return f"P{value.months}M{value.days}DT{seconds:f}S"
        if isinstance(value, dict):
            return {k: intervals(v) for k, v in value.items()}
        if isinstance(value, list):
            return [intervals(v) for v in value]
        return value

    values = array.to_pylist()
    nested = _holds_interval(array.type)
    return pa.array(
        [None if v is None else json.dumps(intervals(v) if nested else v, default=default, ensure_ascii=False,
                                           separators=(",", ":")) for v in values],
        pa.string(),
    )


def _holds_interval(t: pa.DataType) -> bool:
    if t == pa.month_day_nano_interval():
        return True
    if pa.types.is_struct(t):
        return any(_holds_interval(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _holds_interval(t.value_type)
    return False


def _json_array_text(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    """ARRAY<JSON>: a list of JSON texts as one JSON array whose elements are those JSON values (not strings)."""
    return pa.array([None if v is None else "[" + ",".join("null" if e is None else e for e in v) + "]"
                     for v in array.to_pylist()], pa.string())


def _interval_text(array: pa.Array | pa.ChunkedArray, column: str) -> pa.Array:
    """INTERVAL from Arrow's month_day_nano_interval (BigQuery's Arrow form) as PostgreSQL interval input.

    BigQuery's INTERVAL and PostgreSQL's interval hold the same three parts (months, days, and a time in
    microseconds), so the value maps part for part, never normalized (25 hours stay 25 hours, not 1 day 1 hour).
    Per row in Python: an INTERVAL column is rare and Arrow has no compute kernels for this type.

    Raises:
        SourceError: a time part finer than the microsecond (PostgreSQL's interval cannot hold it).
    """
    out: list[str | None] = []
    for v in array.to_pylist():
        if v is None:
            out.append(None)
            continue
        months, days, nanos = v.months, v.days, v.nanoseconds
        if nanos % 1000:
            raise SourceError(f"column {column!r}: INTERVAL {months} months {days} days {nanos} ns has a part finer"
                              " than the microsecond, which PostgreSQL interval cannot hold")
        out.append(f"{months} mons {days} days {nanos // 1000} microseconds")
    return pa.array(out, pa.string())


def _range_text(array: pa.Array | pa.ChunkedArray, column: str, element: str) -> pa.Array:
    """RANGE<T> from Arrow's struct<start, end> as PostgreSQL range input: ``[start,end)`` (BigQuery's ranges
    include the start and exclude the end), a NULL bound unbounded (``[2024-01-01,)``), a NULL struct NULL."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    want = RANGE_ELEMENT_ARROW[element]
    bounds = []
    for name in ("start", "end"):
        part = array.field(name)
        if part.type != want:
            try:
                part = pc.cast(part, want, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise SourceError(f"column {column!r}: RANGE bound {part.type} is not {want} ({exc})") from None
        text = pc.cast(part, pa.string())  # a UTC timestamp ends in Z, which PostgreSQL reads as UTC
        quoted = pc.binary_join_element_wise('"', text, '"', "")
        bounds.append(pc.fill_null(quoted, ""))
    joined = pc.binary_join_element_wise("[", bounds[0], ",", bounds[1], ")", "")
    return pc.if_else(array.is_null(), pa.scalar(None, pa.string()), joined)


def conform(batch: pa.RecordBatch, columns: list[Column]) -> pa.RecordBatch:
    """Cast a batch read from BigQuery to the contract's Arrow types, named as in the target.

    Raises:
        SourceError: a value cannot be represented exactly in the target type.
    """
    arrays = []
    for col in columns:
        want = col.arrow_type
        if col.derived:
            arrays.append(pa.nulls(batch.num_rows, want))
            continue
        arr = batch.column(col.source_name)
        if col.pg_type == "jsonb":
            if col.bq_type == "JSON" and col.mode == "REPEATED" and pa.types.is_list(arr.type):
                arr = _json_array_text(arr)
            elif not pa.types.is_string(arr.type) and not pa.types.is_large_string(arr.type):
                arr = _json_text(arr)
        elif col.bq_type == "GEOGRAPHY" and (pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type)):
            arr = wkb_array_to_wkt(arr, col.source_name)
        elif col.bq_type == "INTERVAL" and arr.type == pa.month_day_nano_interval():
            arr = _interval_text(arr, col.source_name)
        elif col.bq_type.startswith("RANGE<") and pa.types.is_struct(arr.type):
            arr = _range_text(arr, col.source_name, col.bq_type[len("RANGE<"):-1])
        if pa.types.is_string(want) and col.pg_type in {"text", "jsonb"} and len(arr) and pc.any(
            pc.match_substring(arr.cast(pa.string()), "\x00")
        ).as_py():
            raise SourceError(
                f"column {col.source_name!r} holds text with NUL (\\x00) characters, which PostgreSQL text "
                "cannot store; clean them in the source or with a transform"
            )
        if arr.type != want:
            try:
                arr = pc.cast(arr, want, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise SourceError(
                    f"column {col.source_name!r}: cannot convert {arr.type} to {want} exactly ({exc})"
                ) from None
        arrays.append(arr)
    return pa.RecordBatch.from_arrays(arrays, names=[c.target_name for c in columns])
