"""Stage one table's rows: read sessions (or in-process batches), shaped, hashed, COPYed into staging with the
checkpoint in one transaction; a session re-created at the same snapshot; keys re-read by key."""

from __future__ import annotations

import base64
import contextvars
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import pyarrow as pa
from psycopg import sql

from blocks.resources import Resources
from bq_refresh.errors import (
    SourceError,
    StagingLost,
)
from tasks import batches, checkpoints, extract, fastpath, load, quality, reconcile
from tasks import restriction as rs
from tasks.artifacts import Progress, rows_expected
from tasks.batches import (
    SHAPE_ROWS,
    Piece,
    join_batches,
    recut,
    warn_quarantined,
)
from tasks.direct import load_direct
from tasks.fastpath import LocalSource
from tasks.refresh_plan import (
    MAX_SESSION_RECREATIONS,
    RefreshPlan,
    StageManifest,
    pg_type,
    plan_source,
    session_dict,
)
from tasks.sqlnames import ident
from tasks.transform import get_transform
from tasks.typemap import conform

log = logging.getLogger(__name__)


def _reader(res: Resources, plan: RefreshPlan, local: LocalSource | None) -> Any:
    """stream, offset, schema -> (batch, offset after) pairs: BigQuery's Storage Read API, or in-process batches."""
    if local is not None:
        def read_local(stream: str, offset: int, arrow_schema: pa.Schema) -> Iterator[tuple[pa.RecordBatch, int]]:
            at = offset
            for batch in local.streams[stream](offset):
                at += batch.num_rows
                yield batch, at
        return read_local
    client_holder: dict[int, Any] = {}

    def read_bq(stream: str, offset: int, arrow_schema: pa.Schema) -> Iterator[tuple[pa.RecordBatch, int]]:
        client = client_holder.setdefault(threading.get_ident(), res.source.get_read_client())
        return extract.read_stream(client, stream, offset, arrow_schema, table_name=plan.table,
                                   server_offsets=res.source.honours_read_offset, stall_timeout_s=res.source.timeout_s)
    return read_bq


def _target_hashes(res: Resources, plan: RefreshPlan) -> fastpath.HashSet:
    """The row hashes the target holds for the rows this read can meet again: the side table's, for keys the live
    table still holds (a row deleted by hand, or a table emptied, has no hash to skip it by)."""
    assert plan.rowhash_table is not None
    where = []
    target = ident(plan.target_schema, plan.target_table)
    key_match = sql.SQL(" AND ").join(sql.SQL("r.{} = t.{}").format(ident(k), ident(k)) for k in plan.key)
    with res.target.connect() as conn:
        if plan.delete_mode == "soft":
            where.append(sql.SQL("t.{} IS NULL").format(ident(plan.soft_delete_column)))
        if plan.periods is not None and plan.window_column:
            # Window mode reads whole periods: the target's rows of those periods are the ones met again.
            where.append(reconcile.period_scope("t", plan.window_column, pg_type(plan, plan.window_column),
                                                plan.periods))
        elif plan.watermark_from is not None and plan.cursor and not plan.full:
            # Unchanged rows are re-read only when their cursor is inside the read window; so is the target's copy.
            where.append(sql.SQL("t.{} >= {}::{}").format(ident(plan.cursor), sql.Literal(plan.watermark_from),
                                                          sql.SQL(pg_type(plan, plan.cursor))))
        text = sql.SQL("SELECT r.h FROM {} r JOIN {} t ON {}{}").format(
            ident(plan.staging_schema, plan.rowhash_table), target, key_match,
            sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL("")).as_string(conn)
    adbc_conn = res.target.connect_adbc()
    try:
        return fastpath.load_hashes(adbc_conn, text)
    finally:
        adbc_conn.close()


def stage_rows(
    res: Resources, plan: RefreshPlan, *, audit_id: int | None = None, local: LocalSource | None = None,
) -> StageManifest:
    """Read every stream from its checkpointed offset and COPY batches into staging.

    Each batch and its checkpoint commit together. Streams are read in parallel, one ADBC
    connection each; memory is bounded by ``batch_size`` rows per stream. Rows whose hash the
    target already holds are not staged (only their hash, for delete detection). An empty target
    is loaded directly instead (``plan.direct``), published in the same transaction.
    """
    transform = get_transform(plan.transform, plan.table) if plan.transform else None
    read = _reader(res, plan, local)
    with res.target.connect() as conn:
        ckpt = checkpoints.read(conn, plan.registry_schema, plan.checkpoint_id)
    assert ckpt is not None
    if ckpt.status == "completed" and "direct_load" in ckpt.data:
        # A retry after the direct load's COMMIT landed with its answer lost: report what it published.
        log.warning("%s: already loaded by an earlier attempt of this run (its COMMIT's answer was lost)", plan.table)
        return StageManifest(**ckpt.data["direct_load"])
    if ckpt.status != "active":
        raise StagingLost(f"its checkpoint is {ckpt.status}; nothing published, the next run starts over", table=plan.table)
    renewed = 0
    while plan.direct:
        try:
            return load_direct(res, plan, read, transform, audit_id, session_recreated=renewed)
        except fastpath.DirectLoadAbandoned as exc:
            log.warning("%s: direct load abandoned (%s); staging instead", plan.table, exc)
            break
        except extract.SessionExpired:
            # Rolled back whole: a new session at the same snapshot is read again from its start (else every retry,
            # and the next night's resume of this checkpoint, would meet the expired session again).
            renewed += 1
            if renewed > MAX_SESSION_RECREATIONS:
                raise
            log.warning("%s: read session expired during the direct load; re-creating it at the same snapshot",
                        plan.table)
            fresh, _, _, _ = _recreate_session(res, plan, dict(plan.session), int(ckpt.data.get("seq_base", 0)) + 10**13)
            plan = plan.model_copy(update={"session": fresh})
    hashset = _target_hashes(res, plan) if plan.hash_skip else None
    counters = {"read": 0, "staged": 0, "quarantined": 0, "batches": 0, "unchanged": 0}
    lock = threading.Lock()
    recreated = 0
    state = ckpt.data
    # The checkpoint's session, not the plan's: a Prefect retry after a re-created session gets the plan it started
    # with, while the checkpoint holds the new session whose stream names its offsets and done flags belong to.
    session = dict(state.get("session") or plan.session)
    offsets: dict[str, int] = {k: int(v) for k, v in state.get("offsets", {}).items()}
    done: dict[str, bool] = {k: bool(v) for k, v in state.get("done", {}).items()}
    seq_base = int(state.get("seq_base", 0))
    progress = Progress(plan.table, rows_expected(int(session.get("estimated_rows") or 0), full=plan.full,
                                                  whole_table=plan.expected_rows, period_rows=plan.expected_periods),
                        already=plan.rows_already_staged)
    check_names = quality.checksum_names(plan.columns, plan.key, plan.critical_fields)

    def run_stream(stream: str, arrow_schema: pa.Schema, stream_index: int) -> None:
        adbc_conn = res.target.connect_adbc()
        seq = seq_base + stream_index * 1_000_000_000 + offsets.get(stream, 0)
        try:
            committed = offsets.get(stream, 0)
            pieces: list[Piece] = []

            def commit(last: bool) -> None:
                """The pieces shaped since the last checkpoint: their rows COPied into staging and the checkpoint
                moved past them, in one transaction."""
                nonlocal seq, committed, pieces
                loaded = [p.rows for p in pieces if p.rows.num_rows]
                rows = join_batches(loaded) if loaded else pa.RecordBatch.from_pylist([], arrow_schema)
                same_parts = [p.same for p in pieces if p.same is not None]
                same = pa.concat_tables(same_parts) if same_parts else None
                quarantined = [row for p in pieces for row in p.quarantined]
                read_rows = sum(p.read for p in pieces)
                digest = sum(p.digest for p in pieces) % quality.MOD
                pieces = []
                seq += 1
                committed += read_rows
                load.ingest_batch(adbc_conn, rows, load.BatchLoad(
                    plan.staging_schema, plan.staging_table, plan.registry_schema, plan.checkpoint_id, stream,
                    committed, last, seq, plan.table.split(".")[0], plan.table.split(".", 1)[1], audit_id, digest,
                    plan.same_table if plan.hash_skip else None,
                ), quarantined, same)
                with lock:
                    counters["read"] += read_rows
                    counters["staged"] += rows.num_rows
                    counters["unchanged"] += same.num_rows if same is not None else 0
                    counters["quarantined"] += len(quarantined)
                    counters["batches"] += 1 if read_rows else 0
                    progress.update(plan.rows_already_staged + counters["read"])
                warn_quarantined(plan, quarantined)

            # Rows are shaped SHAPE_ROWS at a time (memory) and committed plan.batch_size at a time, exactly: the
            # checkpoint's granularity follows the setting, not the server's batches.
            since = 0  # rows read since the last checkpoint
            for raw in recut((batch for batch, _ in read(stream, committed, arrow_schema)), SHAPE_ROWS,
                             plan.batch_size):
                pieces.append(batches.shape_piece(plan, raw, transform, hashset, check_names))
                since += raw.num_rows
                if since == plan.batch_size:
                    commit(False)
                    since = 0
            commit(True)
        finally:
            adbc_conn.close()

    while True:
        arrow_schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(session["arrow_schema"])))
        todo = [(s, i) for i, s in enumerate(session["streams"]) if not done.get(s)]
        try:
            if len(todo) <= 1:
                for stream, i in todo:
                    run_stream(stream, arrow_schema, i)
            else:
                with ThreadPoolExecutor(max_workers=len(todo)) as pool:
                    # Each stream's thread runs in a copy of this one's context: its log lines belong to the run.
                    for fut in [pool.submit(contextvars.copy_context().run, run_stream, s, arrow_schema, i)
                                for s, i in todo]:
                        fut.result()
            break
        except extract.SessionExpired:
            recreated += 1
            if recreated > MAX_SESSION_RECREATIONS:
                raise
            log.warning("%s: read session expired; re-creating it at the same snapshot", plan.table)
            session, offsets, done, seq_base = _recreate_session(res, plan, session, seq_base + 10**13)

    if plan.reconcile_keys:
        _stage_source_keys(res, plan, session)
        refetched = _refetch_missing_keys(res, plan, session, transform, audit_id, seq_base + 10**12)
        counters["read"] += refetched
        counters["staged"] += refetched
    return StageManifest(
        rows_read=counters["read"], rows_staged=counters["staged"], rows_quarantined=counters["quarantined"],
        batches=counters["batches"], session_recreated=recreated, resumed_from_rows=plan.rows_already_staged,
        read_session=str(session["name"]), rows_unchanged=counters["unchanged"],
    )


def _recreate_session(
    res: Resources, plan: RefreshPlan, old: dict[str, Any], seq_base: int
) -> tuple[dict[str, Any], dict[str, int], dict[str, bool], int]:
    """A new session at the same snapshot: offsets of the old one mean nothing in it, so staging
    restarts empty (in the same transaction as the checkpoint) and the new session is read whole."""
    source = plan_source(plan)
    info = extract.create_session(  # the restriction read back as data, checked, rendered again
        res.source, source, selected_fields=old["selected_fields"],
        row_restriction=rs.storage_text(rs.from_json(old["restriction"])),
        snapshot_time=datetime.fromisoformat(old["snapshot_time"]), max_streams=len(old["streams"]) or 1,
        table_name=plan.table,
    )
    new = {**session_dict(info), "restriction": old["restriction"]}
    with res.target.connect() as conn:
        conn.execute(sql.SQL("TRUNCATE {}").format(ident(plan.staging_schema, plan.staging_table)))
        if plan.hash_skip:
            conn.execute(sql.SQL("TRUNCATE {}").format(ident(plan.staging_schema, plan.same_table)))
        checkpoints.restart_reading(conn, plan.registry_schema, plan.checkpoint_id, {
            "session": new, "offsets": info.offsets, "done": {}, "seq_base": seq_base, "checksum": "0",
            "quarantined": 0, "unchanged": 0})
        conn.commit()
    return new, dict(info.offsets), {}, seq_base


def _stage_source_keys(res: Resources, plan: RefreshPlan, session: dict[str, Any]) -> None:
    """Read every key of the source (same snapshot) for delete reconciliation."""
    key_cols = [c for c in plan.columns if c.target_name in plan.key]
    info = extract.create_session(
        res.source, plan_source(plan), selected_fields=[c.source_name for c in key_cols],
        row_restriction="", snapshot_time=datetime.fromisoformat(session["snapshot_time"]),
        max_streams=1, table_name=plan.table,
    )
    keys_table = plan.staging_table + "_keys"
    with res.target.connect() as conn:
        load.create_key_table(conn, plan.staging_schema, keys_table, key_cols)
        conn.commit()
    client = res.source.get_read_client()
    schema = pa.ipc.read_schema(pa.py_buffer(info.arrow_schema))
    adbc_conn = res.target.connect_adbc()
    try:
        n = 0
        for stream in info.streams:
            for batch, _ in extract.read_stream(client, stream, 0, schema, table_name=plan.table,
                                                server_offsets=res.source.honours_read_offset,
                                                stall_timeout_s=res.source.timeout_s):
                n += batch.num_rows
                with adbc_conn.cursor() as cur:
                    cur.adbc_ingest(keys_table, pa.Table.from_batches([conform(batch, key_cols)]), mode="append",
                                    db_schema_name=plan.staging_schema)
        with adbc_conn.cursor() as cur:  # the count a publish proves the (UNLOGGED) key table still holds
            checkpoints.record_source_keys(cur, plan.registry_schema, plan.checkpoint_id, n)
        adbc_conn.commit()
    finally:
        adbc_conn.close()


MAX_REFETCH_KEYS = 5_000


REFETCH_KEYS_PER_SESSION = 200


def _refetch_missing_keys(res: Resources, plan: RefreshPlan, session: dict[str, Any], transform: Any,
                          audit_id: int | None, seq: int) -> int:
    """Keys the source holds that the target lacks (or holds soft-deleted) and this read did not bring: a key
    deleted and re-added with an older cursor. Their rows are read by key, at the same snapshot, through read
    sessions whose row restriction names them (nothing is written to BigQuery), and staged like any other.

    Raises:
        SourceError: more than MAX_REFETCH_KEYS keys are missing (a full refresh is the way to mend that).
    """
    key_cols = [c for c in plan.columns if c.target_name in plan.key]
    keys = ident(plan.staging_schema, plan.staging_table + "_keys")
    match = sql.SQL(" AND ").join(sql.SQL("x.{} = k.{}").format(ident(k), ident(k)) for k in plan.key)
    live = sql.SQL(" AND x.{} IS NULL").format(ident(plan.soft_delete_column)) if plan.delete_mode == "soft" else sql.SQL("")
    with res.target.connect() as conn:
        missing = conn.execute(sql.SQL(
            "SELECT {} FROM {} k WHERE {} AND NOT EXISTS (SELECT 1 FROM {} x WHERE {}{})"
            " AND NOT EXISTS (SELECT 1 FROM {} x WHERE {}) LIMIT %s").format(
            sql.SQL(", ").join(sql.SQL("k.{}").format(ident(c.target_name)) for c in key_cols), keys,
            sql.SQL(" AND ").join(sql.SQL("k.{} IS NOT NULL").format(ident(k)) for k in plan.key),  # quarantined
            ident(plan.target_schema, plan.target_table), match, live, ident(plan.staging_schema, plan.staging_table),
            match), (MAX_REFETCH_KEYS + 1,)).fetchall()
    if not missing:
        return 0
    if len(missing) > MAX_REFETCH_KEYS:
        raise SourceError(f"more than {MAX_REFETCH_KEYS} source keys are missing from the target and were not read"
                          " by this run; run it with --full-refresh", table=plan.table)
    log.info("%s: %d source key(s) absent from the target with an older cursor; read by key", plan.table, len(missing))
    check_names = quality.checksum_names(plan.columns, plan.key, plan.critical_fields)
    client = res.source.get_read_client()
    adbc_conn = res.target.connect_adbc()
    staged = 0
    try:
        for at in range(0, len(missing), REFETCH_KEYS_PER_SESSION):
            chunk = missing[at:at + REFETCH_KEYS_PER_SESSION]
            by_key = rs.any_of([rs.All(tuple(rs.Cond(c.source_name, "=", c.bq_type, (str(reconcile.period_text(v)),))
                                                 for c, v in zip(key_cols, values, strict=True))) for values in chunk])
            info = extract.create_session(
                res.source, plan_source(plan), selected_fields=session["selected_fields"],
                row_restriction=rs.storage_text(by_key), snapshot_time=datetime.fromisoformat(session["snapshot_time"]),
                max_streams=1, table_name=plan.table)
            schema = pa.ipc.read_schema(pa.py_buffer(info.arrow_schema))
            for stream in info.streams:
                for batch, _ in extract.read_stream(client, stream, 0, schema, table_name=plan.table,
                                                    server_offsets=res.source.honours_read_offset,
                                                    stall_timeout_s=res.source.timeout_s):
                    piece = batches.shape_piece(plan, batch, transform, None, check_names)
                    seq += 1
                    staged += piece.rows.num_rows
                    load.ingest_batch(adbc_conn, piece.rows, load.BatchLoad(
                        plan.staging_schema, plan.staging_table, plan.registry_schema, plan.checkpoint_id,
                        f"refetch-{at}", batch.num_rows, True, seq, plan.table.split(".")[0],
                        plan.table.split(".", 1)[1], audit_id, piece.digest, refetched=piece.rows.num_rows,
                    ), piece.quarantined)
    finally:
        adbc_conn.close()
    return staged
