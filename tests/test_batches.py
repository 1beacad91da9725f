"""The one batch pipeline of both load paths (tasks/batches.py): pieces cut to size without losing, doubling or
reordering a row and without crossing a checkpoint's boundary; every piece of the direct load and of a staged
reload built by ``shape_piece``; the copies equal to BigQuery's rows value by value."""

from __future__ import annotations

import inspect
from collections import Counter
from decimal import Decimal
from typing import Any

import psycopg
import pyarrow as pa
import pytest

from blocks import BigQuerySource
from flows.refresh_table import refresh_table
from tasks import batches
from tasks.registry import register_table
from tests.bqdata import assert_same_rows, pg_rows, put_table, source_rows
from tests.test_engine import SQP_KEY, SQP_SCHEMA, sqp_rows


def numbered(sizes: list[int]) -> list[pa.RecordBatch]:
    out, at = [], 0
    for n in sizes:
        out.append(pa.record_batch({"i": pa.array(range(at, at + n), pa.int64())}))
        at += n
    return out


@pytest.mark.once
@pytest.mark.parametrize(("sizes", "piece", "boundary"), [
    ([10_000], 4_096, None),
    ([100] * 300, 4_096, None),
    ([3, 50_000, 7, 0, 1], 8_192, 50_000),
    ([12_345] * 9, 8_192, 12_000),
    ([8_192] * 5, 8_192, 8_192),
    ([5] * 20, 8, 12),
    ([], 8, 12),
])
def test_recut_keeps_every_row_in_order_and_never_crosses_a_boundary(
    sizes: list[int], piece: int, boundary: int | None,
) -> None:
    out = list(batches.recut(numbered(sizes), piece, boundary))
    values = [v for b in out for v in b.column(0).to_pylist()]
    assert values == list(range(sum(sizes)))
    assert all(0 < b.num_rows <= piece for b in out)
    assert all(b.num_rows == piece for b in out[:-1]) or boundary is not None
    if boundary is not None:  # the running total meets every multiple of the boundary exactly
        totals, at = set(), 0
        for b in out:
            at += b.num_rows
            totals.add(at)
        assert {m for m in range(boundary, sum(sizes) + 1, boundary)} <= totals


@pytest.mark.emulator
@pytest.mark.once  # the pipeline is the client's; the server's flavour is the other tests' matter
@pytest.mark.usefixtures("prefect_harness")
def test_both_load_paths_build_every_piece_with_shape_piece(
    source: BigQuerySource, registry: str, pg: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    callers: Counter[str] = Counter()
    rows_seen: Counter[str] = Counter()
    built = batches.shape_piece

    def spy(*args: Any, **kwargs: Any) -> batches.Piece:
        caller = inspect.stack()[1].frame.f_globals["__name__"]
        piece = built(*args, **kwargs)
        callers[caller] += 1
        rows_seen[caller] += piece.read
        return piece

    monkeypatch.setattr(batches, "shape_piece", spy)
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(20_000))
    register_table(pg, registry, "sqp", {"source": "sqp", "key": SQP_KEY, "mode": "full", "batch_size": 12_000})
    first = refresh_table("sqp")
    assert first["direct_load"] is True and first["rows_inserted"] == 20_000, first
    assert rows_seen["tasks.direct"] == 20_000 and callers["tasks.direct"] >= 3  # pieces of at most 8,192 rows

    changed = sqp_rows(20_000, price_bump=Decimal("0.01"))  # every row's price moves
    kept = sqp_rows(20_000)
    mixed = pa.concat_tables([changed.slice(0, 2_000), kept.slice(2_000)])
    put_table(source, "sqp", SQP_SCHEMA, mixed)
    second = refresh_table("sqp")
    assert (second["rows_updated"], second["rows_skipped_unchanged"]) == (2_000, 18_000), second
    assert rows_seen["tasks.stage"] == 20_000 and callers["tasks.stage"] >= 3
    assert_same_rows(source_rows(source, "sqp"), pg_rows(pg, f'"{registry}".sqp', "1, 2, 3"), SQP_KEY)
