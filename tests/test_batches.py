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


@pytest.mark.emulator
@pytest.mark.once
@pytest.mark.usefixtures("prefect_harness")
def test_a_staged_load_commits_whole_batches_of_pieces_and_resumes_after_a_lost_commit(
    source: BigQuerySource, registry: str, pg: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """batch_size 12,000 = a piece of 8,192 and part of the next: every checkpoint moves by exactly 12,000 rows
    read (the last of a stream by what is left); the second COPY fails before it commits; the next run resumes
    from the first checkpoint and the copy equals BigQuery's rows."""
    from tasks import load

    real = load.ingest_batch
    calls: list[tuple[str, int, bool, int]] = []

    def failing_second(adbc_conn: Any, batch: pa.RecordBatch, batch_load: Any, quarantined: Any,
                       same: Any = None) -> None:
        calls.append((batch_load.stream, batch_load.offset_after, batch_load.stream_done, batch.num_rows))
        if len(calls) == 2:
            raise RuntimeError("the connection dropped before COMMIT (injected)")
        real(adbc_conn, batch, batch_load, quarantined, same)

    monkeypatch.setattr(load, "ingest_batch", failing_second)
    total = 30_000
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(total))
    register_table(pg, registry, "sqp", {"source": "sqp", "key": SQP_KEY, "mode": "full", "batch_size": 12_000,
                                         "direct_initial_load": False})
    try:
        first: dict[str, Any] | None = refresh_table("sqp")
    except Exception:  # noqa: BLE001 - the injected failure, as the flow reports it
        first = None
    if first is None or first["status"] != "success":
        committed = pg.execute(f'SELECT last_processed_row FROM "{registry}".refresh_checkpoints'
                               " WHERE status = 'active'").fetchone()
        assert committed is not None and committed[0] > 0 and committed[0] % 12_000 == 0, committed
        second = refresh_table("sqp")
        assert second["status"] == "success" and second["resumed"] is True, second
        assert second["resumed_from_rows"] == committed[0]
        assert second["resumed_from_rows"] + second["rows_read"] == total
    for stream, offset, done, rows in calls:
        assert done or (offset % 12_000 == 0 and rows == 12_000), (stream, offset, done, rows)
    assert_same_rows(source_rows(source, "sqp"), pg_rows(pg, f'"{registry}".sqp', "1, 2, 3"), SQP_KEY)
    dupes = pg.execute(f'SELECT count(*) - count(DISTINCT (start_date, asin, search_query)) FROM "{registry}".sqp')
    assert dupes.fetchone() == (0,)


@pytest.mark.emulator
@pytest.mark.once
@pytest.mark.usefixtures("prefect_harness")
def test_an_unfinished_reload_is_not_resumed_under_another_hash_function(
    source: BigQuerySource, registry: str, pg: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reload left unfinished holds hashes of unchanged rows made by its hash function; after an upgrade to
    another one the side table is made afresh, so resuming would leave those rows unprotected by any kept hash at
    the publish's delete. The hash function is part of the plan's fingerprint: the run starts over."""
    from tasks import load, rowhash

    total = 30_000
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(total))
    register_table(pg, registry, "sqp", {"source": "sqp", "key": SQP_KEY, "mode": "full", "batch_size": 12_000})
    assert refresh_table("sqp")["rows_inserted"] == total
    changed = pa.concat_tables([sqp_rows(total, price_bump=Decimal("0.01")).slice(0, 3_000),
                                sqp_rows(total).slice(3_000, total - 3_000 - 1)])  # one row gone too
    put_table(source, "sqp", SQP_SCHEMA, changed)
    real, calls = load.ingest_batch, [0]

    def failing_second(*args: Any, **kwargs: Any) -> None:
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("the connection dropped before COMMIT (injected)")
        real(*args, **kwargs)

    monkeypatch.setattr(load, "ingest_batch", failing_second)
    try:
        refresh_table("sqp")
    except Exception:  # noqa: BLE001 - the injected failure
        pass
    assert pg.execute(f'SELECT count(*) FROM "{registry}".refresh_checkpoints WHERE status = %s',
                      ("active",)).fetchone() == (1,)
    monkeypatch.setattr(load, "ingest_batch", real)
    monkeypatch.setattr(rowhash, "VERSION", "xxh64-v1-test-bump")
    run = refresh_table("sqp")
    assert run["status"] == "success" and run["resumed"] is False, run
    assert (run["rows_updated"], run["rows_deleted"]) == (3_000, 1), run
    assert_same_rows(source_rows(source, "sqp"), pg_rows(pg, f'"{registry}".sqp', "1, 2, 3"), SQP_KEY)
