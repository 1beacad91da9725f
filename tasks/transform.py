"""Shaping batches with Polars: named transforms, NULL-key quarantine, cursor high-water mark."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from bq_refresh.errors import ConfigError
from tasks.typemap import Column

Transform = Callable[[pl.LazyFrame], pl.LazyFrame]
TRANSFORMS: dict[str, Transform] = {}
DERIVED: dict[str, dict[str, str]] = {}


def register_transform(name: str, *, derived: dict[str, str] | None = None) -> Callable[[Transform], Transform]:
    """Register a Polars transform that TableSpec.transform can name.

    Args:
        name: the name sync parameters use.
        derived: columns the transform adds, with their BigQuery type names (e.g. {"week_end": "DATE"});
            the target gets them as nullable columns.
    """

    def decorate(fn: Transform) -> Transform:
        TRANSFORMS[name] = fn
        DERIVED[name] = dict(derived or {})
        return fn

    return decorate


def derived_columns(name: str) -> dict[str, str]:
    return DERIVED.get(name, {})


def get_transform(name: str, table: str) -> Transform:
    try:
        return TRANSFORMS[name]
    except KeyError:
        known = ", ".join(sorted(TRANSFORMS)) or "none"
        raise ConfigError(f"unknown transform {name!r} (registered: {known})", table=table) from None


@register_transform("trim_strings")
def _trim_strings(frame: pl.LazyFrame) -> pl.LazyFrame:
    """Strip surrounding whitespace from every text column."""
    return frame.with_columns(pl.col(pl.String).str.strip_chars())


@register_transform("sqp_week_end", derived={"week_end_date": "DATE"})
def _sqp_week_end(frame: pl.LazyFrame) -> pl.LazyFrame:
    """Derive the SQP reporting week's last day (Saturday) from its start date (Sunday)."""
    return frame.with_columns((pl.col("start_date") + pl.duration(days=6)).alias("week_end_date"))


@register_transform("sqp_rates")
def _sqp_rates(frame: pl.LazyFrame) -> pl.LazyFrame:
    """Recompute SQP click/cart-add/purchase rates from counts and search volume, where present."""
    names = frame.collect_schema().names()
    exprs = []
    for stage in ("click", "cart_add", "purchase"):
        total, rate = f"{stage}s_total_count" if stage != "cart_add" else "cart_adds_total_count", f"{stage}_rate"
        if total in names and rate in names and "search_query_volume" in names:
            exprs.append(
                pl.when(pl.col("search_query_volume") > 0)
                .then(pl.col(total).cast(pl.Float64) / pl.col("search_query_volume"))
                .otherwise(None)
                .alias(rate)
            )
    return frame.with_columns(exprs) if exprs else frame


@dataclass
class ShapedBatch:
    """A batch ready for staging, plus what was set aside."""

    rows: pa.RecordBatch
    quarantined: list[dict[str, Any]]
    max_cursor: Any


def _polars_ready(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Polars has no 256-bit decimal (it panics on one): a BIGNUMERIC column, or an ARRAY of them, goes into the
    frame as its exact decimal text, and the cast back to the target's types after the transform restores it."""
    arrays, changed = [], False
    for arr in batch.columns:
        t = arr.type
        if pa.types.is_decimal256(t):
            arr, changed = pc.cast(arr, pa.string()), True
        elif pa.types.is_list(t) and pa.types.is_decimal256(t.value_type):
            arr, changed = pc.cast(arr, pa.list_(pa.string())), True
        arrays.append(arr)
    return pa.RecordBatch.from_arrays(arrays, names=batch.schema.names) if changed else batch


def apply_transform(batch: pa.RecordBatch, transform: Transform, columns: list[Column]) -> pa.RecordBatch:
    """Run a Polars transform lazily and cast the result back to the target's Arrow types (a transform sees a
    BIGNUMERIC as its exact decimal text: Polars has no 256-bit decimal)."""
    frame = pl.from_arrow(_polars_ready(batch))
    assert isinstance(frame, pl.DataFrame)
    out = transform(frame.lazy()).collect().to_arrow()
    arrays = []
    for col in columns:
        arr = out.column(col.target_name)
        arrays.append(arr.cast(col.arrow_type) if arr.type != col.arrow_type else arr)
    return pa.RecordBatch.from_arrays([a.combine_chunks() for a in arrays], names=[c.target_name for c in columns])


def shape(
    batch: pa.RecordBatch,
    *,
    columns: list[Column],
    key: list[str],
    cursor: str | None,
    transform: Transform | None,
) -> ShapedBatch:
    """Transform a conformed batch, set aside rows with a NULL key, and find the batch's max cursor.

    Args:
        batch: rows already cast to the contract types and named as in the target.
        columns: the target columns, in order.
        key: target names of the key columns.
        cursor: target name of the cursor column, if any.
        transform: an optional registered Polars transform.
    """
    if transform is not None:
        batch = apply_transform(batch, transform, columns)
    null_key = None
    for k in key:
        is_null = pc.is_null(batch.column(k))
        null_key = is_null if null_key is None else pc.or_(null_key, is_null)
    quarantined: list[dict[str, Any]] = []
    if null_key is not None and pc.any(null_key).as_py():
        quarantined = batch.filter(null_key).to_pylist()
        batch = batch.filter(pc.invert(null_key))
    max_cursor = None
    if cursor is not None and batch.num_rows:
        max_cursor = pc.max(batch.column(cursor)).as_py()
    return ShapedBatch(batch, quarantined, max_cursor)
