"""The direct first load of an EMPTY target: COPY straight into it, checked, indexed and published in one
transaction."""

from __future__ import annotations

import base64
import logging
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from psycopg import sql

from blocks.resources import Resources
from tasks import batches, checkpoints, fastpath, load, quality, quarantine
from tasks import restriction as rs
from tasks.artifacts import Progress, record_phase, rows_expected
from tasks.batches import SHAPE_ROWS, recut, warn_quarantined, with_hashes
from tasks.fastpath import HASH_COLUMN
from tasks.gate import reconciliation, record_and_gate
from tasks.publish import advance_watermark, new_watermark
from tasks.refresh_plan import PublishResult, RefreshPlan, StageManifest
from tasks.sqlnames import ident

log = logging.getLogger(__name__)


def load_direct(res: Resources, plan: RefreshPlan, read: Any, transform: Any, audit_id: int | None, *,
                 session_recreated: int = 0) -> StageManifest:
    """The initial load of an EMPTY target: COPY straight into it with its indexes dropped, check, build the
    indexes, advance the watermark and close the checkpoint, all in ONE transaction. Readers see an empty
    table until the commit, then every row; views, grants and row-level security are never touched.

    Streams are read and shaped in parallel threads and copied through one connection (one transaction),
    in a single COPY. A crash leaves the table empty; the rerun loads it again from the start.

    Raises:
        fastpath.DirectLoadAbandoned: the target got rows meanwhile or the source repeats a key (rolled
            back; the caller stages instead, which keeps the latest row of a repeated key).
        QualityCheckFailed: a hard check failed (rolled back, nothing published).
    """
    target = ident(plan.target_schema, plan.target_table)
    check_names = quality.checksum_names(plan.columns, plan.key, plan.critical_fields)
    arrow_schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(plan.session["arrow_schema"])))
    counters = {"read": 0, "loaded": 0, "quarantined": 0, "batches": 0, "checksum": 0}
    lock = threading.Lock()
    quarantined: list[dict[str, Any]] = []
    progress = Progress(plan.table, rows_expected(int(plan.session.get("estimated_rows") or 0), full=plan.full,
                                                  whole_table=plan.expected_rows, period_rows=plan.expected_periods))
    out_schema = pa.schema([pa.field(c.target_name, c.arrow_type) for c in plan.columns])
    hashed_schema = pa.schema([*out_schema, *([pa.field(HASH_COLUMN, pa.int64())] if plan.row_hash else [])])
    # Row hashes go to the side table, after the live rows and in the same transaction: spilled to a local
    # Arrow file meanwhile (the one COPY stream carries the live rows), so memory stays bounded.
    side_names = [*plan.key, HASH_COLUMN]
    spill_dir = tempfile.TemporaryDirectory(prefix="bqr-hashes-") if plan.row_hash else None
    spill_path = f"{spill_dir.name}/hashes.arrow" if spill_dir is not None else ""

    # No checkpoint per batch here: pieces of batches.SHAPE_ROWS (or batch_size, when smaller) are shaped and
    # handed to the one COPY as they come.
    cut = min(plan.batch_size, SHAPE_ROWS)

    def producer(stream: str) -> Any:
        def produce(put: Any) -> None:
            for raw in recut((batch for batch, _ in read(stream, 0, arrow_schema)), cut):
                piece = batches.shape_piece(plan, raw, transform, None, check_names)
                with lock:
                    counters["read"] += piece.read
                    counters["loaded"] += piece.rows.num_rows
                    counters["quarantined"] += len(piece.quarantined)
                    counters["batches"] += 1
                    counters["checksum"] = (counters["checksum"] + piece.digest) % quality.MOD
                    quarantined.extend(piece.quarantined)
                    progress.update(counters["read"])
                warn_quarantined(plan, piece.quarantined)
                put(piece.rows.select(hashed_schema.names))
        return produce

    adbc_conn = res.target.connect_adbc()
    quoting = res.target.connect(autocommit=True)
    session = fastpath.AdbcSession(adbc_conn, quoting)
    try:
        session.execute(sql.SQL("SET LOCAL maintenance_work_mem = {}").format(
            sql.Literal(f"{res.settings.index_build_memory_mb}MB")))
        session.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(target))
        has_rows = session.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(target)).fetchone()
        if has_rows and has_rows[0]:
            raise fastpath.DirectLoadAbandoned("the target is no longer empty", table=plan.table)
        dropped = fastpath.drop_indexes(session, plan.target_schema, plan.target_table,
                                        fastpath.table_indexes(session, plan.target_schema, plan.target_table))
        failures: list[BaseException] = []
        shaped = fastpath.pipelined([producer(s) for s in plan.session["streams"]], depth=2, errors=failures)
        spill_schema = pa.schema([*(hashed_schema.field(k) for k in plan.key), pa.field("h", pa.int64())])
        spill = pa.ipc.new_file(spill_path, spill_schema) if spill_dir is not None else None

        def live_rows() -> Iterator[pa.RecordBatch]:
            for batch in shaped:
                if spill is not None:
                    spill.write_batch(pa.RecordBatch.from_arrays(batch.select(side_names).columns,
                                                                 schema=spill_schema))
                yield batch.select(out_schema.names)

        reader = pa.RecordBatchReader.from_batches(out_schema, live_rows())
        try:
            with adbc_conn.cursor() as cur:  # one COPY for the whole load
                cur.adbc_ingest(plan.target_table, reader, mode="append", db_schema_name=plan.target_schema)
        except BaseException:
            if failures:  # a producer's own error (bad data, source down) or a cancellation, not the COPY's
                raise failures[0] from None  # rewording of it (which would look like a transient IO error)
            raise
        if spill is not None:
            spill.close()
            assert plan.rowhash_table is not None
            # The target was empty: any hash kept for it is stale (its rows were deleted by hand).
            session.execute(sql.SQL("TRUNCATE {}").format(ident(plan.staging_schema, plan.rowhash_table)))
            try:
                # Read, not memory-mapped: a mapped file's pages count in this process's RSS (10M rows: +365 MB).
                with pa.OSFile(spill_path) as source, adbc_conn.cursor() as cur:
                    spilled = pa.ipc.open_file(source)
                    cur.adbc_ingest(plan.rowhash_table, pa.RecordBatchReader.from_batches(
                        spilled.schema, (spilled.get_batch(i) for i in range(spilled.num_record_batches))),
                        mode="append", db_schema_name=plan.staging_schema)
            except Exception as exc:
                if "23505" in str(exc) or "duplicate key" in str(exc):  # as the live table's key would say below
                    raise fastpath.DirectLoadAbandoned("the source repeats a key", table=plan.table) from None
                raise
        quarantine.set_aside(adbc_conn, plan.registry_schema, audit_id, plan.table, quarantined)
        record_phase(plan.table, "checking")
        results = quality.staged_checks(
            res, table=plan.table, target_schema=plan.target_schema, target_table=plan.target_table,
            staging_schema=plan.target_schema, staging_table=plan.target_table, columns=plan.columns, key=plan.key,
            critical=plan.critical_fields, config=plan.checks, source_ref=plan.source_ref,
            restriction=rs.from_json(plan.session["restriction"]), partition_filter=plan.source_partition_filter,
            snapshot=None if plan.source_job_result else plan.session.get("snapshot_time"),
            stage_state={"checksum": str(counters["checksum"]), "quarantined": counters["quarantined"],
                         "verify_sample": plan.verify_sample if plan.row_hash else None},
            previous_rows=None, conn=session, adbc_conn=adbc_conn,
            # the live rows with the hashes kept beside them, re-hashed from what PostgreSQL stored
            verify_from=with_hashes(plan) if plan.row_hash else None,
        )
        present = session.execute(sql.SQL("SELECT count(*) FROM {}").format(target)).fetchone()
        present_rows = int(present[0]) if present else -1
        results.append(quality.CheckResult("published_count", present_rows, counters["loaded"],
                                           ok=present_rows == counters["loaded"], hard="published_count" in plan.checks.hard,
                                           detail="rows loaded present in the live table"))
        results += reconciliation(session, plan, target, None)
        record_and_gate(res, plan, audit_id, results, adbc_conn.rollback, "failed quality check")
        record_phase(plan.table, "publishing")  # the indexes, the watermark and the COMMIT
        try:
            fastpath.rebuild_indexes(session, plan.target_schema, plan.target_table, dropped)
        except Exception as exc:
            if "23505" in str(exc) or "duplicate key" in str(exc) or "could not create unique index" in str(exc):
                raise fastpath.DirectLoadAbandoned("the source repeats a key", table=plan.table) from None
            raise
        watermark, future = new_watermark(session, plan, target)
        advance_watermark(session, plan, watermark, res.settings.schedule_anchor)
        manifest = StageManifest(
            rows_read=counters["read"], rows_staged=counters["loaded"], rows_quarantined=counters["quarantined"],
            batches=counters["batches"], session_recreated=session_recreated, resumed_from_rows=0,
            read_session=str(plan.session["name"]),
            published=PublishResult(
                rows_inserted=counters["loaded"], rows_updated=0, rows_unchanged=0, rows_deleted=0, duplicate_keys=0,
                watermark=watermark, dry_run=False,
                checks_failed_soft=[r.name for r in results if not r.ok and not r.hard],
                indexes_rebuilt=[n for n, _ in dropped.constraints + dropped.indexes], future_cursor_rows=future),
        )
        checkpoints.complete(session, plan.registry_schema, plan.checkpoint_id, counters["loaded"],
                             {"direct_load": manifest.model_dump(mode="json")})
        for leftover in load.run_tables(plan.staging_table):
            session.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident(plan.staging_schema, leftover)))
        adbc_conn.commit()
    except BaseException:
        try:
            adbc_conn.rollback()
        except Exception:  # noqa: BLE001 - the connection may be gone; the transaction dies with it
            pass
        raise
    finally:
        adbc_conn.close()
        quoting.close()
        if spill_dir is not None:
            spill_dir.cleanup()
    return manifest
