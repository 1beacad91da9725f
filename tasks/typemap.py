"""The BigQuery -> PostgreSQL type contract, for DDL and for the Arrow data on its way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from bq_refresh.errors import SourceError

SCALAR_PG = {
    "INT64": "bigint", "INTEGER": "bigint",
    "FLOAT64": "double precision", "FLOAT": "double precision",
    "NUMERIC": "numeric(38,9)", "BIGNUMERIC": "numeric", "BIGDECIMAL": "numeric",
    "BOOL": "boolean", "BOOLEAN": "boolean",
    "STRING": "text", "BYTES": "bytea",
    "DATE": "date", "DATETIME": "timestamp", "TIMESTAMP": "timestamptz", "TIME": "time",
    "JSON": "jsonb", "RECORD": "jsonb", "STRUCT": "jsonb",
    "GEOGRAPHY": "text", "INTERVAL": "interval",
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
        """The column's type in staging: JSON travels as text (binary COPY can't write jsonb from text)."""
        if self.pg_type == "jsonb":
            return "text"
        if self.bq_type == "INTERVAL":
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

    values = array.to_pylist()
    return pa.array(
        [None if v is None else json.dumps(v, default=default, ensure_ascii=False, separators=(",", ":")) for v in values],
        pa.string(),
    )


def _wkb_to_text(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    # The emulator sends GEOGRAPHY as WKB; BigQuery sends WKT. Keep WKB as hex text (PostGIS reads both).
    return pa.array([None if v is None else v.hex() for v in array.to_pylist()], pa.string())


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
            if not pa.types.is_string(arr.type) and not pa.types.is_large_string(arr.type):
                arr = _json_text(arr)
        elif col.bq_type == "GEOGRAPHY" and pa.types.is_binary(arr.type):
            arr = _wkb_to_text(arr)
        elif col.bq_type == "INTERVAL" and not pa.types.is_string(arr.type):
            arr = pa.array([None if v is None else str(v) for v in arr.to_pylist()], pa.string())
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
