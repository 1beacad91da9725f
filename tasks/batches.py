"""What both load paths (staged and direct) do to the rows they read: cut into pieces of ``SHAPE_ROWS``, each
conformed, shaped, hashed and split from the rows the target already holds (``shape_piece``, the one batch
builder); the checksum, the quarantine's warning; the live rows with their kept hashes."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from tasks import fastpath, quality
from tasks.fastpath import HASH_COLUMN
from tasks.refresh_plan import RefreshPlan
from tasks.sqlnames import quote_ident
from tasks.transform import Transform, shape
from tasks.typemap import conform

log = logging.getLogger(__name__)
# Rows shaped at a time, by both load paths: each shaping thread's copies (conform, shape, hash) stay small
# whatever the checkpoint's batch (bench/run.py --big: the 1M-row direct load peaked at 545 MB at 50k-row pieces).
SHAPE_ROWS = 8_192


def join_batches(parts: list[pa.RecordBatch]) -> pa.RecordBatch:
    """One contiguous batch of ``parts`` (concat_batches raises where a column would pass Arrow's 2 GiB offsets,
    where combine_chunks would split it into chunks, and a first chunk taken alone would drop rows)."""
    return parts[0] if len(parts) == 1 else pa.concat_batches(parts)


def recut(batches: Iterable[pa.RecordBatch], piece: int, boundary: int | None = None) -> Iterator[pa.RecordBatch]:
    """The rows of ``batches`` again, in order, as batches of ``piece`` rows: small ones joined, large ones cut.

    With ``boundary``, no batch crosses a multiple of ``boundary`` rows (counted from the first row), so that
    pieces add up to exactly ``boundary`` rows a checkpoint. The last batch may be shorter.
    """
    pending: list[pa.RecordBatch] = []
    size = done = 0  # rows pending; rows yielded since the last boundary

    def join() -> pa.RecordBatch:
        return join_batches(pending)

    for batch in batches:
        while batch.num_rows:
            want = piece if boundary is None else min(piece, boundary - done)
            take = batch.slice(0, want - size)
            pending.append(take)
            size += take.num_rows
            batch = batch.slice(take.num_rows)
            if size == want:
                yield join()
                done = 0 if boundary is None else (done + size) % boundary
                pending, size = [], 0
    if pending:
        yield join()


@dataclass
class Piece:
    """One piece of a stream, shaped: the rows to load (with their hash, when kept), the hashes of rows the target
    already holds, the rows set aside, and what the checksum check expects of the rows loaded."""

    read: int
    rows: pa.RecordBatch
    same: pa.Table | None
    quarantined: list[dict[str, Any]]
    digest: int


def shape_piece(plan: RefreshPlan, raw: pa.RecordBatch, transform: Transform | None,
                hashset: fastpath.HashSet | None, check_names: list[str]) -> Piece:
    """Conform, transform and shape one piece of a stream, hash it and split off the rows the target already
    holds (``hashset``): the one batch builder of both load paths."""
    shaped = shape(conform(raw, plan.columns), columns=plan.columns, key=plan.key, cursor=plan.cursor,
                   transform=transform)
    rows, same = split_unchanged(plan, shaped.rows, hashset)
    return Piece(raw.num_rows, rows, same, shaped.quarantined, batch_digest(plan, rows, check_names))


def batch_digest(plan: RefreshPlan, rows: pa.RecordBatch, check_names: list[str]) -> int:
    """What the checksum check expects: with row hashes, the number of rows in the verification sample;
    otherwise the order-independent checksum of the rows."""
    if not plan.checks.checksum:
        return 0
    if plan.row_hash:
        return fastpath.sampled(rows.column(HASH_COLUMN), plan.verify_sample)
    return quality.checksum(rows, plan.columns, check_names)


def split_unchanged(
    plan: RefreshPlan, rows: pa.RecordBatch, hashset: fastpath.HashSet | None,
) -> tuple[pa.RecordBatch, pa.Table | None]:
    """(rows to stage, with their hash; hashes of the rows the target already holds)."""
    if not plan.row_hash:
        return rows, None
    hashes = fastpath.row_hashes(rows, plan.columns)
    same = None
    if hashset is not None and rows.num_rows:
        mask = hashset.contains(hashes)
        if mask.any():
            hit, keep = pa.array(mask), pa.array(~mask)
            same = pa.table({"h": hashes.filter(hit)})
            rows, hashes = rows.filter(keep), hashes.filter(keep)
    return rows.append_column(HASH_COLUMN, hashes), same


def warn_quarantined(plan: RefreshPlan, rows: list[dict[str, Any]]) -> None:
    """One batch's rows set aside for a NULL key, said in the run's log (both load paths)."""
    if rows:
        log.warning("%s: %d row(s) with NULL in key column(s) %s quarantined", plan.table, len(rows), ", ".join(plan.key))


def with_hashes(plan: RefreshPlan) -> str:
    """The live rows joined with their kept hashes (column _bqr_row_hash), as a query."""
    assert plan.rowhash_table is not None
    cols = ", ".join(f"t.{quote_ident(c.target_name)}" for c in plan.columns)
    on = " AND ".join(f"r.{quote_ident(k)} = t.{quote_ident(k)}" for k in plan.key)
    return (f"SELECT {cols}, r.h AS {quote_ident(HASH_COLUMN)} FROM {quote_ident(plan.target_schema)}."  # noqa: S608
            f"{quote_ident(plan.target_table)} t JOIN {quote_ident(plan.staging_schema)}."
            f"{quote_ident(plan.rowhash_table)} r ON {on}")
