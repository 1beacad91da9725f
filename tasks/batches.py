"""What both load paths (staged and direct) do to each batch: its checksum, the split of rows whose hash the
target already holds, the quarantine's warning; the live rows with their kept hashes."""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from tasks import fastpath, quality
from tasks.fastpath import HASH_COLUMN
from tasks.refresh_plan import RefreshPlan
from tasks.sqlnames import quote_ident

log = logging.getLogger(__name__)


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
