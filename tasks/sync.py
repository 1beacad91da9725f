"""One table's refresh in three steps: plan (schema, drift, session, checkpoint), stage, publish."""

from __future__ import annotations

import base64
import contextvars
import hashlib
import json
import logging
import tempfile
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import pyarrow as pa
from psycopg import sql
from psycopg.types.json import Jsonb
from pydantic import BaseModel

from blocks.resources import Resources
from bq_refresh.errors import (
    ConfigError,
    GroupHeld,
    QualityCheckFailed,
    SchemaDriftError,
    SourceError,
    StagingLost,
)
from tasks import digest, extract, fastpath, headroom, load, quality, reconcile, registry
from tasks import restriction as rs
from tasks.artifacts import Progress, record_phase, rows_expected
from tasks.fastpath import HASH_COLUMN, LocalSource
from tasks.partitions import restrict
from tasks.planning import streams_within
from tasks.registry import RegistryEntry
from tasks.sources import earlier_result, over_budget, resolve_source, result_over_budget
from tasks.spec import QualityConfig, TableSpec
from tasks.sqlnames import ident, idents, quote_ident
from tasks.transform import get_transform, shape
from tasks.typemap import CURSOR_TYPES, Column, arrow_source_type, conform, declared_form

log = logging.getLogger(__name__)
FUNCTION_NAME = "refresh_table"
MAX_SESSION_RECREATIONS = 3
DIRECT_BATCH_ROWS = 8_192  # bench/run.py --big: peak RSS of the 1M-row direct load 545 MB at 50k-row batches


class RefreshPlan(BaseModel):
    """Everything a run of one table needs, small enough to pass between Prefect tasks."""

    table: str
    config_id: int
    registry_schema: str
    target_schema: str
    target_table: str
    staging_schema: str
    staging_table: str
    columns: list[Column]
    key: list[str]
    cursor: str | None
    cursor_type: str | None
    mode: str
    full: bool
    window_column: str | None
    delete_mode: str
    soft_delete_column: str
    max_delete_fraction: float
    batch_size: int
    transform: str | None
    source_ref: str
    bigquery_job_id: str | None
    source_job_result: bool = False  # source_ref is a query job's result table: read and counted without time travel
    source_partition_filter: str = ""  # what its read sessions carry: require_partition_filter (tasks/partitions.py)
    source_location: str | None = None  # where the source's jobs run (a resumed run finds its query job there)
    bigquery_bytes: dict[str, int] = {}  # what BigQuery scans for the run (tasks.sources; the audit row records it)
    session: dict[str, Any]
    checkpoint_id: int
    watermark_from: str | None
    resumed: bool
    rows_already_staged: int
    target_created: bool
    drift: dict[str, Any]
    source_schema: list[dict[str, str]]
    reconcile_keys: bool
    frequency_hours: int
    critical_fields: list[str] = []
    checks: QualityConfig = QualityConfig()
    shadow: bool = False
    audit_id: int | None = None
    row_hash: bool = False  # the target's row hashes are kept, in the side table ``rowhash_table``
    rowhash_table: str | None = None  # in the staging schema (load.rowhash_table)
    verify_sample: int = 1  # with row hashes: 1 row in verify_sample is read back and verified value by value
    hash_skip: bool = False  # rows whose hash the target holds are not staged
    direct: bool = False  # initial load straight into the empty target
    local: bool = False  # batches handed over in-process (tasks.fastpath.LocalSource)
    # Window mode: the periods this run read whole and replaces (period_text values), and the rows the
    # target must hold in each after the publish (the source's distinct keys at the read snapshot).
    periods: list[str | None] | None = None
    expected_periods: list[tuple[str | None, int]] | None = None
    expected_rows: int | None = None  # full mode / delete reconciliation: the rows the whole target must hold
    source_timezone: str = "UTC"  # DATE and DATETIME cursors are compared with the snapshot in this zone
    publish_group: str | None = None  # published together with the group's other members (publish_group)
    restarted: str | None = None  # why an unfinished run's checkpoint was not resumed (the audit row says it)
    # TIMESTAMP columns the target declares ``timestamp without time zone``: target column -> the zone whose wall
    # time is written there (the table's target_timezone), converted explicitly, never by the session's TimeZone.
    wall_time: dict[str, str] = {}
    # ``bq-refresh verify --repair``: a repair mends what verify found and is not a night: the watermark, the source
    # schema and the refresh time stay as they were, and its snapshot is not the table's freshness. ``repair_keys``:
    # the keys (each a list of the key columns' canonical texts, tasks/digest.py) it re-read and replaces one by one.
    repair: bool = False
    repair_keys: list[list[str | None]] | None = None

    @property
    def same_table(self) -> str:
        return self.staging_table + "_same"

    @property
    def target_label(self) -> str:
        return f"{self.target_schema}.{self.target_table}"


def staging_name(table: str) -> str:
    digest = hashlib.sha1(table.encode()).hexdigest()[:8]
    base = "".join(ch if ch.isalnum() else "_" for ch in table.split(".")[-1])[:40]
    return f"{base}__{digest}"


def _columns(spec: TableSpec, source: extract.SourceTable, table: str) -> list[Column]:
    names = spec.columns or [f.name for f in source.fields]
    for required in [*spec.key, *(c for c in (spec.cursor, spec.window_column) if c)]:
        if required not in names:
            names = [*names, required]
    cols = []
    for name in names:
        field = source.field(name)
        if field is None:
            raise SourceError(f"column {name!r} not found in the source {source.ref}", table=table)
        cols.append(Column(field.name, spec.target_name(field.name), field.type, field.mode))
    if spec.transform:
        from tasks.transform import derived_columns

        for name, bq_type in derived_columns(spec.transform).items():
            cols.append(Column(name, name, bq_type, "NULLABLE", derived=True))
    targets = [c.target_name for c in cols]
    dupes = {t for t in targets if targets.count(t) > 1}
    if dupes:
        raise ConfigError(f"two source columns map to the same target column(s) {sorted(dupes)}", table=table)
    return cols


def _drift(
    entry: RegistryEntry, spec: TableSpec, source: extract.SourceTable, columns: list[Column],
    existing: dict[str, str] | None,
) -> tuple[dict[str, Any], list[Column]]:
    """Compare the source with the stored schema and the target; return (report, columns to add)."""
    report: dict[str, Any] = {}
    selected = {c.source_name for c in columns}
    if entry.source_schema:
        before = {f["name"]: f for f in entry.source_schema}
        now = {f.name: f for f in source.fields}
        removed = sorted(n for n in before if n not in now and (spec.columns is None or n in selected))
        changed = sorted(
            f"{n}: {before[n]['type']}/{before[n]['mode']} -> {now[n].type}/{now[n].mode}"
            for n in before if n in now and n in selected
            and (before[n]["type"], before[n]["mode"]) != (now[n].type, now[n].mode)
        )
        if removed:
            raise SchemaDriftError(f"source columns removed: {', '.join(removed)}", table=entry.name, removed=removed)
        if changed:
            raise SchemaDriftError(f"source column types changed: {'; '.join(changed)}", table=entry.name, changed=changed)
        added = sorted(n for n in now if n not in before and n in selected)
        if added:
            report["added_in_source"] = added
    to_add: list[Column] = []
    if existing is not None:
        to_add = [c for c in columns if c.target_name not in existing]
        if to_add:
            required = [c.source_name for c in to_add if c.mode == "REQUIRED" or c.target_name in spec.key]
            if spec.drift_policy == "freeze" or required:
                names = ", ".join(c.source_name for c in to_add)
                why = "drift policy is freeze" if not required else f"{', '.join(required)} cannot be added as nullable"
                raise SchemaDriftError(f"new source column(s) {names} not in the target ({why})",
                                       table=entry.name, added=[c.source_name for c in to_add])
            report["columns_added"] = [c.target_name for c in to_add]
    return report, to_add


def plan_refresh(
    res: Resources, entry: RegistryEntry, *, full_refresh: bool = False, batch_size: int | None = None,
    dry_run: bool = False, local: LocalSource | None = None, allow_deletes: bool = False,
    repair_periods: list[str | None] | None = None, repair_keys: list[list[str | None]] | None = None,
) -> RefreshPlan:
    """Resolve the source, check drift, prepare target and staging, and open or resume the read.

    ``repair_periods`` (window mode; ``bq-refresh verify --repair``): read exactly these periods whole and replace
    them, every row staged (a row edited by hand in PostgreSQL still has its old hash: no hash skip).
    ``repair_keys`` (``verify --repair`` below a size): read exactly these keys through a read session whose row
    restriction names them, and replace exactly them (a key the source no longer holds is deleted as the table's
    delete policy says); nothing else is read, written or deleted.

    A valid active checkpoint of an earlier, unfinished run of the same table is resumed: its
    staging table, read session and stream offsets are reused.
    """
    settings = res.settings
    spec = entry.spec()
    table = entry.name
    record_phase(table, "planning")
    budget = spec.maximum_bytes_billed or settings.bigquery_maximum_bytes_billed
    if local is not None:
        source = extract.SourceTable(local.ref, [extract.SourceField(f.name, *arrow_to_bq(f, table))
                                                 for f in local.schema])
    else:
        source = _earlier_result(res, entry, spec) or resolve_source(
            res.source, table=table, source_ref=spec.source, query=spec.query,
            materialization_dataset=spec.materialization_dataset, maximum_bytes_billed=budget, dry_run=dry_run)
    columns = _columns(spec, source, table)
    by_source = {c.source_name: c for c in columns}
    cursor_col = by_source[spec.cursor] if spec.cursor else None
    if cursor_col is not None and (cursor_col.bq_type not in CURSOR_TYPES or cursor_col.mode == "REPEATED"):
        raise SourceError(
            f"cursor column {spec.cursor!r} is {cursor_col.bq_type}; use a TIMESTAMP, DATETIME, DATE or INT64 column",
            table=table,
        )
    if spec.transform:
        get_transform(spec.transform, table)
    target_schema, target_table = (spec.target.split(".", 1) if spec.target else (entry.table_schema, entry.table_name))
    if spec.shadow:
        target_schema = settings.shadow_schema
    key = [by_source[k].target_name for k in spec.key]
    # A watermark kept for another target (shadow <-> live) says nothing about this one: read everything.
    moved = entry.watermark_target is not None and entry.watermark_target != f"{target_schema}.{target_table}"
    full = full_refresh or spec.mode == "full" or entry.watermark is None or moved

    with res.target.connect() as conn:
        existing = load.target_columns(conn, target_schema, target_table) or None
        refusal = load.rls_refusal(conn, target_schema, target_table) if existing is not None else None
        if refusal:  # before anything is written: rows the role cannot see would be left stale
            raise ConfigError(refusal, table=table)
        drift, to_add = _drift(entry, spec, source, columns, existing)
        if drift.get("added_in_source") and existing is not None and not full:
            # A column added by drift is filled for every row, not only those this run would read: the whole
            # source is read (rows unchanged apart from it are rewritten once). Until a publish records the new
            # source schema, every run does so, so a failed backfill is retried by the next run.
            full = True
            drift["backfill"] = drift["added_in_source"]
        if repair_keys is not None:
            if drift.get("backfill"):
                raise ConfigError("a column added in the source is not filled yet: run the table once before"
                                  " repairing its rows", table=table)
            full = False  # a few keys: never "the whole table" (its deletes, its watermark)
        created = False
        row_hash = spec.row_hash
        if existing is None:
            load.create_target(conn, target_schema, target_table, columns, key)
            created = True
        else:
            load.check_target_shape(conn, target_schema, target_table, key, table)
            if to_add:
                load.add_columns(conn, target_schema, target_table, to_add)
        if spec.delete_policy.mode == "soft":
            conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} timestamptz").format(
                ident(target_schema, target_table), ident(spec.delete_policy.soft_delete_column)))
        hashes = (load.ensure_rowhash(conn, settings.staging_schema, target_schema, target_table, columns, key)
                  if row_hash else None)
        conn.commit()

        staging_schema = settings.staging_schema
        stage_table = staging_name(table)
        ckpt_table = ident(settings.schema_name, "refresh_checkpoints")
        conn.execute(sql.SQL("UPDATE {} SET status = 'expired' WHERE status = 'active' AND expires_at < now()").format(ckpt_table))
        active = conn.execute(
            sql.SQL("SELECT id, checkpoint_data, last_processed_row FROM {} WHERE function_name = %s"
                    " AND table_schema = %s AND table_name = %s AND status = 'active'").format(ckpt_table),
            (FUNCTION_NAME, entry.table_schema, entry.table_name),
        ).fetchone()
        has_rows = conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {}), pg_has_role((SELECT relowner FROM pg_class"
                                        " WHERE oid = %s::regclass), 'USAGE')").format(ident(target_schema, target_table)),
                                (ident(target_schema, target_table).as_string(conn),)).fetchone()
        empty = not (has_rows and has_rows[0])
        owner = bool(has_rows and has_rows[1])  # only the owner may drop and build the indexes
        # A group member stages (the group publishes together): no direct load, which publishes as it loads.
        # ... and not into a table the users declared otherwise (binary COPY needs the contract's types; staging
        # checks every value against the declared ones).
        declared = existing or {}
        direct = (spec.direct_initial_load and spec.publish_group is None and empty and owner and not dry_run
                  and all(c.staging_type == c.pg_type for c in columns)
                  and all(declared.get(c.target_name, declared_form(c.pg_type)) == declared_form(c.pg_type)
                          for c in columns))
        hash_skip = row_hash and not empty and not full_refresh and repair_periods is None and repair_keys is None
        if repair_periods is not None and (spec.mode != "window" or not spec.window_column):
            raise ConfigError("only a window-mode table repairs by period (verify --repair runs a full refresh of"
                              " the others)", table=table)
        wall_time = {c.target_name: spec.target_timezone for c in columns
                     if c.bq_type == "TIMESTAMP" and c.mode != "REPEATED"
                     and declared.get(c.target_name) == "timestamp without time zone"}
        keyed = sorted(set(wall_time) & set(key))
        if keyed and spec.target_timezone != "UTC":
            raise SourceError(f"key column(s) {', '.join(keyed)} of {target_schema}.{target_table} are declared"
                              f" timestamp without time zone: target_timezone {spec.target_timezone!r} cannot apply"
                              " to a key (keys are matched in UTC); leave target_timezone at UTC or declare the"
                              " column timestamptz", table=table)
        fingerprint = hashlib.sha1(repr((columns, key, full, spec.mode, entry.watermark, spec.lookback, target_schema,
                                         spec.checks, spec.critical_fields, row_hash, direct, hash_skip,
                                         local is not None, spec.publish_group, hashes, sorted(wall_time.items()),
                                         repair_periods, repair_keys)).encode()).hexdigest()
        restarted = None
        if active is not None:
            why = ("its checkpoint keeps its row restriction as SQL text (written by an earlier version)"
                   if "restriction" not in active[1].get("session", {})
                   else "the plan changed" if active[1].get("fingerprint") != fingerprint
                   else (None if local is not None else result_gone(active[1].get("plan", {}), source)
                         or _snapshot_gone(res, source.ref, active[1]))
                   or _staging_lost(conn, staging_schema, stage_table, active[1], int(active[2] or 0)))
            if why:
                log.warning("%s: the unfinished run is not resumed (%s); starting over", table, why)
                restarted = f"the unfinished run of checkpoint {active[0]} is not resumed: {why}"
                conn.execute(sql.SQL("UPDATE {} SET status = 'expired' WHERE id = %s").format(ckpt_table), (active[0],))
                active = None
        if active is None and source.reused:  # the earlier job's result was for the run that is not resumed
            source = resolve_source(res.source, table=table, source_ref=spec.source, query=spec.query,
                                    materialization_dataset=spec.materialization_dataset,
                                    maximum_bytes_billed=budget, dry_run=dry_run)
        if active is not None:
            data = active[1]
            conn.commit()
            return RefreshPlan(**data["plan"], checkpoint_id=active[0], resumed=True,
                               rows_already_staged=int(active[2] or 0), session=data["session"])

        watermark_from = None
        floor_expr = None  # the cursor read: rows at or past the watermark's floor (its own value included)
        if not full and cursor_col is not None and local is None:  # in-process batches are read whole
            wm = extract.parse_watermark(entry.watermark, cursor_col.bq_type)
            floor = extract.watermark_floor(wm, cursor_col.bq_type, spec.lookback_amount())
            watermark_from = None if floor is None else str(floor)
            if floor is not None:
                floor_expr = rs.Cond(cursor_col.source_name, ">=", cursor_col.bq_type,
                                       (floor.isoformat() if isinstance(floor, date) else str(floor),))
        restriction: rs.Restriction = floor_expr or rs.EVERY_ROW
        # A query's result holds what its job read when it started: the watermark moves no further than that.
        snapshot = (source.read_at or datetime.now(UTC)).replace(microsecond=0) - timedelta(seconds=1)
        at = None if source.job_result else snapshot.isoformat()  # a query's result table has no past to travel to
        selected = [c.source_name for c in columns if not c.derived]
        streams = streams_within(spec.streams, settings.max_connections)
        first = None
        if budget is not None and local is None:  # the read's estimate, before any query job or ReadRows
            first = extract.create_session(res.source, source, selected_fields=selected,
                                           row_restriction=rs.storage_text(restriction), snapshot_time=snapshot,
                                           max_streams=streams, table_name=table)
            _refuse_over_budget(table, source, first, budget)
        soft_column = spec.delete_policy.soft_delete_column if spec.delete_policy.mode == "soft" else None
        window_col = by_source[spec.window_column] if spec.window_column else None
        periods: list[str | None] | None = None
        expected_periods: list[tuple[str | None, int]] | None = None
        expected_rows: int | None = None
        if repair_keys is not None:
            key_columns = [digest.DigestColumn(c.source_name, c.target_name, c.bq_type) for c in
                           (by_source[k] for k in spec.key)]
            by_key = digest.key_restriction(key_columns, repair_keys)
            if by_key is None or local is not None:
                raise ConfigError("these keys cannot be named in a row restriction (a key column of type "
                                  f"{', '.join(c.bq_type for c in key_columns)}): repair by period or full refresh",
                                  table=table)
            restriction = by_key
            slices = reconcile.source_slices(res, source.ref, snapshot=at, key=spec.key, window=None, where=by_key,
                                             partition_filter=source.partition_filter)
            expected_rows = slices[0].keys if slices else 0
        elif spec.mode == "window" and window_col is not None:
            # Which periods changed is decided from the source (a delete changes no cursor), and each is read whole.
            slices = (fastpath.local_slices(local, spec.key, window_col.source_name) if local is not None else
                      reconcile.source_slices(res, source.ref, snapshot=at, key=spec.key,
                                              window=window_col.source_name, cursor_floor=floor_expr,
                                              partition_filter=source.partition_filter))
            held = {} if created else reconcile.target_period_counts(conn, target_schema, target_table,
                                                                     window_col.target_name, soft_column)
            choice = reconcile.choose_periods(slices, held, everything=floor_expr is None or repair_periods is not None)
            if repair_periods is not None:
                choice = choice.only(repair_periods)
            reconcile.refuse_vanished(table, choice.vanished, spec.max_vanished_periods, allow_deletes,
                                      window_col.source_name)
            restriction = reconcile.window_restriction(choice.read, window_col.source_name, window_col.bq_type)
            periods = choice.read + choice.vanished
            expected_periods = list(choice.expected.items())
        elif spec.mode == "full" or spec.delete_policy.mode != "none":  # the whole table is in the run's scope
            slices = (fastpath.local_slices(local, spec.key, None) if local is not None else
                      reconcile.source_slices(res, source.ref, snapshot=at, key=spec.key, window=None,
                                              partition_filter=source.partition_filter))
            expected_rows = slices[0].keys if slices else 0
        if local is not None:
            session = extract.ReadSessionInfo(
                name=f"local-{uuid.uuid4().hex[:12]}", streams=list(local.streams),
                arrow_schema=local.schema.serialize().to_pybytes(), snapshot_time=snapshot.isoformat(),
                row_restriction="", selected_fields=selected, offsets={k: 0 for k in local.streams},
                estimated_rows=local.estimated_rows,
            )
        elif first is not None and first.row_restriction == restrict(rs.storage_text(restriction),
                                                                     source.partition_filter):
            session = first
        else:
            session = extract.create_session(
                res.source, source, selected_fields=selected, row_restriction=rs.storage_text(restriction),
                snapshot_time=snapshot, max_streams=streams, table_name=table,
            )
            if budget is not None:
                _refuse_over_budget(table, source, session, budget)
        if full or empty:  # may need about twice the table's size while it runs: refused now if it cannot fit
            headroom.check_load_fits(conn, table=table, target_schema=target_schema, target_table=target_table,
                                     empty=empty, direct=direct, source_rows=max(session.estimated_rows, source.num_rows),
                                     source_bytes=session.estimated_bytes or source.num_bytes,
                                     budget_mb=settings.disk_budget_mb)
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident(staging_schema, stage_table)))
        load.create_staging(conn, staging_schema, stage_table, columns, row_hash=row_hash,
                            same=stage_table + "_same" if hash_skip else None, logged=settings.staging_logged)
        plan_fields: dict[str, Any] = dict(
            table=table, config_id=entry.id, registry_schema=settings.schema_name, target_schema=target_schema,
            target_table=target_table, staging_schema=staging_schema, staging_table=stage_table,
            columns=columns, key=key, cursor=cursor_col.target_name if cursor_col else None,
            cursor_type=cursor_col.bq_type if cursor_col else None, mode=spec.mode, full=full,
            window_column=by_source[spec.window_column].target_name if spec.window_column else None,
            delete_mode=spec.delete_policy.mode, soft_delete_column=spec.delete_policy.soft_delete_column,
            max_delete_fraction=spec.delete_policy.max_delete_fraction,
            batch_size=batch_size or spec.batch_size or settings.batch_size, transform=spec.transform,
            source_ref=source.ref, bigquery_job_id=source.job_id, watermark_from=watermark_from,
            source_job_result=source.job_result, source_partition_filter=source.partition_filter,
            bigquery_bytes=_bigquery_bytes(source, session),
            source_location=source.location,
            target_created=created, drift=drift, source_schema=[f.__dict__ for f in source.fields],
            reconcile_keys=(spec.delete_policy.mode != "none" and spec.mode == "incremental" and not full
                            and repair_keys is None),
            frequency_hours=entry.refresh_frequency_hours,
            critical_fields=[spec.target_name(c) for c in spec.critical_fields], checks=spec.checks, shadow=spec.shadow,
            row_hash=row_hash, rowhash_table=hashes, hash_skip=hash_skip, direct=direct, local=local is not None,
            periods=periods, expected_periods=expected_periods, expected_rows=expected_rows,
            source_timezone=spec.source_timezone, publish_group=spec.publish_group, wall_time=wall_time,
            repair=repair_periods is not None or repair_keys is not None, repair_keys=repair_keys,
            verify_sample=(res.settings.verify_sample if (session.estimated_rows or 0) >= res.settings.verify_sample_min_rows
                           else 1) if row_hash else 1,
        )
        # the restriction as data (a resumed run reads no SQL text back); in-process batches are read whole
        session_data = {**_session_dict(session), "restriction": rs.to_json(restriction if local is None else rs.EVERY_ROW)}
        plan_json = RefreshPlan(**plan_fields, checkpoint_id=0, resumed=False, rows_already_staged=0,
                                session=session_data).model_dump(mode="json")
        stored_plan = {k: v for k, v in plan_json.items()
                       if k not in {"checkpoint_id", "resumed", "rows_already_staged", "session", "restarted"}}
        row = conn.execute(
            sql.SQL("INSERT INTO {} (function_name, table_schema, table_name, checkpoint_data, last_processed_row,"
                    " status, expires_at) VALUES (%s, %s, %s, %s, 0, 'active', now() + make_interval(hours => %s))"
                    " RETURNING id").format(ckpt_table),
            (FUNCTION_NAME, entry.table_schema, entry.table_name,
             Jsonb({"fingerprint": fingerprint, "plan": stored_plan, "session": session_data,
                    "offsets": session.offsets, "done": {}}), settings.checkpoint_ttl_hours),
        ).fetchone()
        conn.commit()
        assert row is not None
        return RefreshPlan(**plan_fields, checkpoint_id=int(row[0]), resumed=False, rows_already_staged=0,
                           session=session_data, restarted=restarted)


def _earlier_result(res: Resources, entry: RegistryEntry, spec: TableSpec) -> extract.SourceTable | None:
    """The result table of the query job of this table's unfinished run (a query or view source), found by the
    job's id: the resumed run reads what its checkpoint counts, without running (and paying for) the query again."""
    with res.target.connect(autocommit=True) as conn:
        row = conn.execute(sql.SQL("SELECT checkpoint_data->'plan' FROM {} WHERE function_name = %s AND table_schema = %s"
                                   " AND table_name = %s AND status = 'active' AND expires_at >= now()").format(
            ident(res.settings.schema_name, "refresh_checkpoints")), (FUNCTION_NAME, entry.table_schema,
                                                                     entry.table_name)).fetchone()
    plan = row[0] if row else None
    if not plan or not plan.get("source_job_result") or not plan.get("bigquery_job_id"):
        return None
    return earlier_result(res.source, table=entry.name, source_ref=spec.source, query=spec.query,
                          materialization_dataset=spec.materialization_dataset, job_id=plan["bigquery_job_id"],
                          result_ref=plan["source_ref"], location=plan.get("source_location"))


def _refuse_over_budget(table: str, source: extract.SourceTable, session: extract.ReadSessionInfo, budget: int) -> None:
    refusal = (result_over_budget(table, source, session.estimated_bytes, budget) if source.job_result
               else over_budget(table, f"the read of {source.ref}", session.estimated_bytes, budget))
    if refusal is not None:
        raise refusal


def _bigquery_bytes(source: extract.SourceTable, session: extract.ReadSessionInfo) -> dict[str, int]:
    """What BigQuery scans for the run: the read session's estimate and, for a query or view source, its job's
    bytes processed and billed (and its dry run's estimate)."""
    figures = {"read_estimated": session.estimated_bytes}
    if source.job_id:
        figures |= {"query_processed": source.bytes_processed, "query_billed": source.bytes_billed,
                    "query_estimated": source.bytes_estimated}
    return figures


def result_gone(plan: dict[str, Any], source: extract.SourceTable) -> str | None:
    """Why a checkpoint's plan, read from a query job's result table, cannot be resumed on ``source`` (the source
    resolved now), or None. Its offsets count the rows of that job's result; when that result was not found again
    (the job unknown, its anonymous result expired after about 24 hours, the table dropped, the statement changed),
    the query ran again: its new anonymous result is another table the earlier session cannot read, and a named
    result table (materialization_dataset, the emulator's DDL) was replaced under the offsets."""
    if not plan.get("source_job_result"):
        return None
    job_id, ref = plan.get("bigquery_job_id"), plan.get("source_ref")
    if source.reused and source.job_id == job_id and source.ref == ref:
        return None
    return f"the result {ref} of its query job {job_id} can no longer be read (expired, not found or replaced)"


def _snapshot_gone(res: Resources, source_ref: str, data: dict[str, Any]) -> str | None:
    """Why a checkpoint's read snapshot can no longer be read (it left the dataset's time travel window: a new session
    at it would be refused, and the counts at it could not be taken), or None. The dataset is asked for its window
    only when the snapshot is older than the shortest window BigQuery allows."""
    if data.get("plan", {}).get("source_job_result"):
        return None  # a query's result table is read as it is, not as of a time
    snapshot = datetime.fromisoformat(str(data["session"]["snapshot_time"]))
    now = datetime.now(UTC)
    if extract.snapshot_out_of_reach(snapshot, now, extract.MIN_TIME_TRAVEL_HOURS) is None:
        return None
    return extract.snapshot_out_of_reach(snapshot, now, extract.time_travel_hours(res.source, source_ref))


def _staging_lost(conn: Any, staging_schema: str, stage_table: str, data: dict[str, Any], staged: int) -> str | None:
    """Why a run's staging cannot be trusted, or None when it provably holds what its checkpoint records.

    Staging is UNLOGGED: PostgreSQL's crash recovery empties it while the (logged) checkpoint keeps its
    offsets and counts. Each batch and its checkpoint commit together, so an intact staging holds exactly
    ``last_processed_row`` staged rows, the checkpoint's ``unchanged`` hashes and, once read, its
    ``source_keys``; anything else means rows are gone and a publish would lose, or delete, what it never saw.
    """
    expected = {stage_table: staged, stage_table + "_same": int(data.get("unchanged") or 0)}
    if "source_keys" in data:
        expected[stage_table + "_keys"] = int(data["source_keys"])
    for name, want in expected.items():
        if not load.table_exists(conn, staging_schema, name):
            if name != stage_table and not want:
                continue  # e.g. no hash skipping in this plan
            return f"staging table {name} is missing"
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ident(staging_schema, name))).fetchone()
        have = int(row[0]) if row else -1
        if have != want:
            return f"staging table {name} holds {have} rows, the checkpoint records {want} (emptied by a crash?)"
    return None


def _session_dict(session: extract.ReadSessionInfo) -> dict[str, Any]:
    return {
        "name": session.name, "streams": session.streams, "snapshot_time": session.snapshot_time,
        "row_restriction": session.row_restriction, "selected_fields": session.selected_fields,
        "arrow_schema": base64.b64encode(session.arrow_schema).decode(),
        "estimated_rows": session.estimated_rows,
    }


def arrow_to_bq(field: pa.Field, table: str) -> tuple[str, str]:
    """The BigQuery type and mode an in-process Arrow column stands for (typemap.arrow_source_type: its Arrow type
    and the extension metadata BigQuery's Storage Read API sets)."""
    found = arrow_source_type(field)
    if found is None:
        raise SourceError(f"column {field.name!r}: Arrow type {field.type} has no BigQuery counterpart here", table=table)
    return found


class PublishResult(BaseModel):
    """What publishing changed (or, in a dry run, would change)."""

    rows_inserted: int
    rows_updated: int
    rows_unchanged: int
    rows_deleted: int
    duplicate_keys: int
    watermark: str | None
    dry_run: bool
    checks_failed_soft: list[str] = []
    indexes_rebuilt: list[str] = []
    future_cursor_rows: int = 0  # rows whose cursor is past the read snapshot (+5 min): loaded, alerted


class StageManifest(BaseModel):
    """What staging read and kept."""

    rows_read: int
    rows_staged: int
    rows_quarantined: int
    batches: int
    session_recreated: int
    resumed_from_rows: int
    read_session: str
    rows_unchanged: int = 0
    published: PublishResult | None = None  # a direct initial load publishes while it stages


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


def _pg_type(plan: RefreshPlan, column: str) -> str:
    return next(c.pg_type for c in plan.columns if c.target_name == column)


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
            where.append(reconcile.period_scope("t", plan.window_column, _pg_type(plan, plan.window_column),
                                                plan.periods))
        elif plan.watermark_from is not None and plan.cursor and not plan.full:
            # Unchanged rows are re-read only when their cursor is inside the read window; so is the target's copy.
            where.append(sql.SQL("t.{} >= {}::{}").format(ident(plan.cursor), sql.Literal(plan.watermark_from),
                                                          sql.SQL(_pg_type(plan, plan.cursor))))
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
        row = conn.execute(sql.SQL("SELECT status, checkpoint_data FROM {} WHERE id = %s").format(
            ident(plan.registry_schema, "refresh_checkpoints")), (plan.checkpoint_id,)).fetchone()
    assert row is not None
    if row[0] == "completed" and "direct_load" in row[1]:
        # A retry after the direct load's COMMIT landed with its answer lost: report what it published.
        log.warning("%s: already loaded by an earlier attempt of this run (its COMMIT's answer was lost)", plan.table)
        return StageManifest(**row[1]["direct_load"])
    if row[0] != "active":
        raise StagingLost(f"its checkpoint is {row[0]}; nothing published, the next run starts over", table=plan.table)
    renewed = 0
    while plan.direct:
        try:
            return _load_direct(res, plan, read, transform, audit_id, session_recreated=renewed)
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
            fresh, _, _, _ = _recreate_session(res, plan, dict(plan.session), int(row[1].get("seq_base", 0)) + 10**13)
            plan = plan.model_copy(update={"session": fresh})
    hashset = _target_hashes(res, plan) if plan.hash_skip else None
    counters = {"read": 0, "staged": 0, "quarantined": 0, "batches": 0, "unchanged": 0}
    lock = threading.Lock()
    recreated = 0
    state = row[1]
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

            def flush(rows: pa.Table, last: bool) -> None:
                nonlocal seq, committed
                raw = rows.combine_chunks().to_batches()
                merged = raw[0] if raw else pa.RecordBatch.from_pylist([], arrow_schema)
                shaped = shape(conform(merged, plan.columns), columns=plan.columns, key=plan.key,
                               cursor=plan.cursor, transform=transform)
                seq += 1
                committed += merged.num_rows
                rows, same = _split_unchanged(plan, shaped.rows, hashset)
                digest = _digest(plan, rows, check_names)
                load.ingest_batch(adbc_conn, rows, load.BatchLoad(
                    plan.staging_schema, plan.staging_table, plan.registry_schema, plan.checkpoint_id, stream,
                    committed, last, seq, plan.table.split(".")[0], plan.table.split(".", 1)[1], audit_id, digest,
                    plan.same_table if plan.hash_skip else None,
                ), shaped.quarantined, same)
                with lock:
                    counters["read"] += merged.num_rows
                    counters["staged"] += rows.num_rows
                    counters["unchanged"] += same.num_rows if same is not None else 0
                    counters["quarantined"] += len(shaped.quarantined)
                    counters["batches"] += 1 if merged.num_rows else 0
                    progress.update(plan.rows_already_staged + counters["read"])
                _warn_quarantined(plan, shaped.quarantined)

            # Server batches are re-cut to exactly batch_size rows: memory and checkpoint granularity
            # follow the setting, not the server's batch size.
            pending = pa.Table.from_batches([], arrow_schema)
            for batch, _ in read(stream, committed, arrow_schema):
                pending = pa.concat_tables([pending, pa.Table.from_batches([batch])])
                while pending.num_rows >= plan.batch_size:
                    flush(pending.slice(0, plan.batch_size), False)
                    pending = pending.slice(plan.batch_size)
            flush(pending, True)
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


def _digest(plan: RefreshPlan, rows: pa.RecordBatch, check_names: list[str]) -> int:
    """What the checksum check expects: with row hashes, the number of rows in the verification sample;
    otherwise the order-independent checksum of the rows."""
    if not plan.checks.checksum:
        return 0
    if plan.row_hash:
        return fastpath.sampled(rows.column(HASH_COLUMN), plan.verify_sample)
    return quality.checksum(rows, plan.columns, check_names)


def _split_unchanged(
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


def _plan_source(plan: RefreshPlan) -> extract.SourceTable:
    """The source a plan reads, as read sessions need it (no schema: the plan's columns have it)."""
    return extract.SourceTable(plan.source_ref, [], job_result=plan.source_job_result,
                               partition_filter=plan.source_partition_filter)


def _recreate_session(
    res: Resources, plan: RefreshPlan, old: dict[str, Any], seq_base: int
) -> tuple[dict[str, Any], dict[str, int], dict[str, bool], int]:
    """A new session at the same snapshot: offsets of the old one mean nothing in it, so staging
    restarts empty (in the same transaction as the checkpoint) and the new session is read whole."""
    source = _plan_source(plan)
    info = extract.create_session(  # the restriction read back as data, checked, rendered again
        res.source, source, selected_fields=old["selected_fields"],
        row_restriction=rs.storage_text(rs.from_json(old["restriction"])),
        snapshot_time=datetime.fromisoformat(old["snapshot_time"]), max_streams=len(old["streams"]) or 1,
        table_name=plan.table,
    )
    new = {**_session_dict(info), "restriction": old["restriction"]}
    with res.target.connect() as conn:
        conn.execute(sql.SQL("TRUNCATE {}").format(ident(plan.staging_schema, plan.staging_table)))
        if plan.hash_skip:
            conn.execute(sql.SQL("TRUNCATE {}").format(ident(plan.staging_schema, plan.same_table)))
        conn.execute(
            sql.SQL("UPDATE {} SET checkpoint_data = checkpoint_data || %s, last_processed_row = 0 WHERE id = %s").format(
                ident(plan.registry_schema, "refresh_checkpoints")),
            (Jsonb({"session": new, "offsets": info.offsets, "done": {}, "seq_base": seq_base, "checksum": "0",
                    "quarantined": 0, "unchanged": 0}), plan.checkpoint_id),
        )
        conn.commit()
    return new, dict(info.offsets), {}, seq_base


def _stage_source_keys(res: Resources, plan: RefreshPlan, session: dict[str, Any]) -> None:
    """Read every key of the source (same snapshot) for delete reconciliation."""
    key_cols = [c for c in plan.columns if c.target_name in plan.key]
    info = extract.create_session(
        res.source, _plan_source(plan), selected_fields=[c.source_name for c in key_cols],
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
    reg = quote_ident(plan.registry_schema)
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
            cur.execute(f"UPDATE {reg}.refresh_checkpoints SET checkpoint_data = checkpoint_data"  # noqa: S608
                        " || jsonb_build_object('source_keys', $1::bigint) WHERE id = $2::int",
                        parameters=(n, plan.checkpoint_id))
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
                res.source, _plan_source(plan), selected_fields=session["selected_fields"],
                row_restriction=rs.storage_text(by_key), snapshot_time=datetime.fromisoformat(session["snapshot_time"]),
                max_streams=1, table_name=plan.table)
            schema = pa.ipc.read_schema(pa.py_buffer(info.arrow_schema))
            for stream in info.streams:
                for batch, _ in extract.read_stream(client, stream, 0, schema, table_name=plan.table,
                                                    server_offsets=res.source.honours_read_offset,
                                                    stall_timeout_s=res.source.timeout_s):
                    shaped = shape(conform(batch, plan.columns), columns=plan.columns, key=plan.key,
                                   cursor=plan.cursor, transform=transform)
                    rows, _ = _split_unchanged(plan, shaped.rows, None)
                    seq += 1
                    staged += rows.num_rows
                    load.ingest_batch(adbc_conn, rows, load.BatchLoad(
                        plan.staging_schema, plan.staging_table, plan.registry_schema, plan.checkpoint_id,
                        f"refetch-{at}", batch.num_rows, True, seq, plan.table.split(".")[0],
                        plan.table.split(".", 1)[1], audit_id, _digest(plan, rows, check_names), refetched=rows.num_rows,
                    ), shaped.quarantined)
    finally:
        adbc_conn.close()
    return staged


def check_staged(res: Resources, plan: RefreshPlan, *, audit_id: int | None) -> list[quality.CheckResult]:
    """Run the quality gate on the staged rows; record every result; a hard failure discards the
    staging and raises QualityCheckFailed (nothing is published)."""
    record_phase(plan.table, "checking")
    with res.target.connect(autocommit=True) as conn:
        row = conn.execute(sql.SQL("SELECT checkpoint_data FROM {} WHERE id = %s").format(
            ident(plan.registry_schema, "refresh_checkpoints")), (plan.checkpoint_id,)).fetchone()
        state = row[0] if row else {}
        prev = conn.execute(
            sql.SQL("SELECT rows_processed FROM {} WHERE refresh_config_id = %s AND status IN ('success', 'warning')"
                    " AND NOT coalesce((sync_metadata->>'dry_run')::boolean, false) ORDER BY id DESC LIMIT 1").format(
                ident(plan.registry_schema, "refresh_audit_log")), (plan.config_id,)).fetchone()
    results = quality.staged_checks(
        res, table=plan.table, target_schema=plan.target_schema, target_table=plan.target_table,
        staging_schema=plan.staging_schema, staging_table=plan.staging_table, columns=plan.columns, key=plan.key,
        critical=plan.critical_fields, config=plan.checks, source_ref=plan.source_ref,
        restriction=rs.from_json(plan.session["restriction"]), partition_filter=plan.source_partition_filter,
        snapshot=None if plan.source_job_result else plan.session.get("snapshot_time"),
        stage_state={**state, "verify_sample": plan.verify_sample if plan.row_hash else None},
        previous_rows=int(prev[0]) if prev and prev[0] is not None else None,
    )
    with res.target.connect(autocommit=True) as conn:  # a table declared narrower than the contract: every value fits
        declared = load.target_columns(conn, plan.target_schema, plan.target_table)
        results += quality.declared_fit(conn, staging=ident(plan.staging_schema, plan.staging_table),
                                        columns=plan.columns, key=plan.key, declared=declared)
    _record_and_gate(res, plan, audit_id, results, lambda: None, "failed quality check")
    return results


def _record_and_gate(res: Resources, plan: RefreshPlan, audit_id: int | None, results: list[quality.CheckResult],
                     rollback: Any, reason: str) -> None:
    """Record every check result (committed apart, so a failed run keeps them); on a hard failure roll the
    run's transaction back, discard its staging and raise QualityCheckFailed."""
    with res.target.connect(autocommit=True) as audit_conn:
        quality.record(audit_conn, plan.registry_schema, audit_id, results)
    if any(r.hard and not r.ok for r in results):
        rollback()
        discard_staging(res, plan, reason)
        quality.raise_on_hard_failures(plan.table, results)


def _warn_quarantined(plan: RefreshPlan, rows: list[dict[str, Any]]) -> None:
    """One batch's rows set aside for a NULL key, said in the run's log (both load paths)."""
    if rows:
        log.warning("%s: %d row(s) with NULL in key column(s) %s quarantined", plan.table, len(rows), ", ".join(plan.key))


def publish(res: Resources, plan: RefreshPlan, *, dry_run: bool = False, audit_id: int | None = None) -> PublishResult:
    """Publish the staged rows into the live table in ONE transaction (or roll back a dry run).

    In the same transaction: deletes by mode and policy, the watermark, the registry's times,
    the checkpoint marked completed, and staging dropped.
    """
    record_phase(plan.table, "publishing")
    with res.target.connect() as conn:
        conn.execute("SET LOCAL lock_timeout = '60s'")
        earlier = _published_before(conn, plan)
        if earlier is not None:
            conn.rollback()
            return earlier
        result = _publish_in(conn, res, plan, dry_run=dry_run, audit_id=audit_id)
        if dry_run:
            conn.rollback()
        else:
            conn.commit()
    return result


def publish_group(res: Resources, group: str, plans: list[RefreshPlan], *, dry_run: bool = False,
                  audit_ids: dict[str, int] | None = None) -> dict[str, PublishResult]:
    """Publish the staged rows of every member of a publish group in ONE transaction: all or none.

    Each member is published as ``publish`` does it (deletes, checks after publish, watermark, checkpoint,
    staging dropped), one after the other on the same connection; a member whose publish fails (a check
    after publish, the delete guard, a staging crash recovery emptied) rolls the whole transaction back, so
    every member keeps its previous data. The failing member's staging is discarded by the failure itself;
    the caller discards the others' (GroupHeld.member names the member).

    Raises:
        GroupHeld: a member's publish failed; nothing of the group was published.
    """
    audit_ids = audit_ids or {}
    for plan in plans:
        record_phase(plan.table, "publishing")
    with res.target.connect() as conn:
        conn.execute("SET LOCAL lock_timeout = '60s'")
        earlier = {p.table: _published_before(conn, p) for p in plans}
        done = {t: r for t, r in earlier.items() if r is not None}
        if done and len(done) == len(plans):  # the group's COMMIT landed, its answer was lost: report it
            conn.rollback()
            return done
        if done:
            conn.rollback()
            first = sorted(done)[0]
            raise GroupHeld(f"publish group {group!r}: {', '.join(sorted(done))} already published by another run,"
                            " the others not: the group is not published together tonight", table=first,
                            group=group, member=first)
        results: dict[str, PublishResult] = {}
        for plan in plans:
            try:
                results[plan.table] = _publish_in(conn, res, plan, dry_run=dry_run, audit_id=audit_ids.get(plan.table))
            except BaseException as exc:
                if not conn.closed:
                    conn.rollback()
                raise GroupHeld(f"publish group {group!r} held at its previous data: {exc}", table=plan.table,
                                group=group, member=plan.table) from exc
        if dry_run:
            conn.rollback()
        else:
            conn.commit()
    return results


def _published_before(conn: Any, plan: RefreshPlan) -> PublishResult | None:
    """What an earlier attempt of this run published, when its COMMIT landed though its answer was lost
    (the checkpoint row is locked for the rest of the transaction either way)."""
    ckpt = conn.execute(sql.SQL("SELECT status, checkpoint_data FROM {} WHERE id = %s FOR UPDATE").format(
        ident(plan.registry_schema, "refresh_checkpoints")), (plan.checkpoint_id,)).fetchone()
    if ckpt is not None and ckpt[0] == "completed" and "published" in (ckpt[1] or {}):
        log.warning("%s: already published by an earlier attempt of this run (its COMMIT's answer was lost)",
                    plan.table)
        return PublishResult(**ckpt[1]["published"])
    return None


def _publish_in(conn: Any, res: Resources, plan: RefreshPlan, *, dry_run: bool, audit_id: int | None) -> PublishResult:
    """The publish of one table inside the caller's transaction (the caller commits, or rolls back a dry run).
    A failure rolls the transaction back, discards this table's staging where it cannot be trusted, and raises."""
    target = ident(plan.target_schema, plan.target_table)
    staging = ident(plan.staging_schema, plan.staging_table)
    hashes = ident(plan.staging_schema, plan.rowhash_table) if plan.row_hash and plan.rowhash_table else None
    p = load.PublishSQL(target, staging, plan.columns, plan.key, plan.cursor, hashes, plan.wall_time)
    same = ident(plan.staging_schema, plan.same_table)
    soft = plan.soft_delete_column if plan.delete_mode == "soft" else None
    ckpt_table = ident(plan.registry_schema, "refresh_checkpoints")
    ckpt = conn.execute(sql.SQL("SELECT status, last_processed_row, checkpoint_data FROM {} WHERE id = %s"
                                " FOR UPDATE").format(ckpt_table), (plan.checkpoint_id,)).fetchone()
    if ckpt is None or ckpt[0] != "active":
        conn.rollback()
        raise StagingLost(f"its checkpoint is {ckpt[0] if ckpt else 'gone'}: the staged rows cannot be trusted;"
                          " nothing published, the next run starts over", table=plan.table)
    counts = conn.execute(
        sql.SQL("SELECT count(*), count(DISTINCT ({})) FROM {}").format(idents(plan.key), staging)
    ).fetchone()
    assert counts is not None
    staged, distinct = int(counts[0]), int(counts[1])
    skipped = int((ckpt[2] or {}).get("unchanged") or 0)
    lost = _staging_lost(conn, plan.staging_schema, plan.staging_table, ckpt[2] or {}, int(ckpt[1] or 0))
    if lost:
        # Publishing or deleting from a staging that crash recovery emptied would lose rows: the run fails
        # with nothing published, and the next one starts over.
        conn.rollback()
        discard_staging(res, plan, lost)
        raise StagingLost(f"{lost}; nothing published, the next run starts over", table=plan.table)
    # A bulk load into an empty table is faster with its secondary indexes built afterwards
    # (measured: bench/index_rebuild.py). Same transaction: readers never see the table without them.
    rebuilt: list[tuple[str, str]] = []
    if not dry_run and staged >= res.settings.index_rebuild_min_rows:
        # Only the owner may drop and build indexes (a least-privilege role may just write the rows).
        empty = conn.execute(sql.SQL("SELECT NOT EXISTS (SELECT 1 FROM {}) AND pg_has_role("
                                     "(SELECT relowner FROM pg_class WHERE oid = %s::regclass), 'USAGE')").format(target),
                             (target.as_string(conn),)).fetchone()
        if empty and empty[0]:
            rebuilt = load.secondary_indexes(conn, plan.target_schema, plan.target_table)
            for name, _definition in rebuilt:
                conn.execute(sql.SQL("DROP INDEX {}").format(ident(plan.target_schema, name)))
    merged = conn.execute(p.merge(revive_column=soft)).fetchone()
    assert merged is not None
    inserted, updated = int(merged[0]), int(merged[1])
    if p.hashes is not None:  # the published rows' hashes, in the same transaction
        conn.execute(p.upsert_hashes())

    delete_scope: sql.Composable | None = None
    if plan.repair_keys is not None:  # the keys it re-read, and nothing else
        delete_scope, source_keys = _repair_scope(plan), staging
    elif plan.mode == "window":
        if plan.periods is not None and plan.window_column:  # every period in it was read whole
            delete_scope = reconcile.period_scope("t", plan.window_column, _pg_type(plan, plan.window_column),
                                                  plan.periods)
        source_keys = staging
    elif plan.full and (plan.mode == "full" or plan.delete_mode != "none"):
        delete_scope, source_keys = sql.SQL("true"), staging
    elif plan.reconcile_keys:
        delete_scope, source_keys = sql.SQL("true"), ident(plan.staging_schema, plan.staging_table + "_keys")
    deleted = 0
    if (delete_scope is not None and plan.hash_skip and source_keys is staging and not soft
            and (plan.mode != "window" or plan.window_column in plan.key)):
        # Every target row in scope accounted for by a source row (unchanged by hash, or a staged key that
        # was there already): nothing to delete, and the anti-join over the whole scope is not needed.
        in_scope = conn.execute(sql.SQL("SELECT count(*) FROM {} t WHERE {}").format(target, delete_scope)).fetchone()
        if in_scope is not None and int(in_scope[0]) == skipped + distinct - inserted:
            delete_scope = None
    if delete_scope is not None and (plan.delete_mode != "none" or plan.mode in {"window", "full"}):
        gone = sql.SQL("{} AND NOT EXISTS (SELECT 1 FROM {} s WHERE {})").format(
            delete_scope, source_keys, p.key_match("s", "t"))
        if plan.hash_skip and source_keys is staging:  # rows read but not staged: unchanged, still there
            assert p.hashes is not None
            gone = sql.SQL("{} AND NOT EXISTS (SELECT 1 FROM {} r JOIN {} u ON u.h = r.h WHERE {})").format(
                gone, p.hashes, same, p.key_match("r", "t"))
        # A row deleted (or soft-deleted: its return is then staged, not skipped) loses its hash too.
        forget = (sql.SQL(", x AS ({})").format(p.hashes_of("r")) if p.hashes is not None else sql.SQL(""))
        keys = sql.SQL(", ").join(sql.SQL("t.{}").format(ident(k)) for k in plan.key)
        if soft:
            row = conn.execute(sql.SQL("WITH d AS (UPDATE {} t SET {} = now() WHERE {} AND t.{} IS NULL RETURNING {}){}"
                                       " SELECT count(*) FROM d").format(
                target, ident(soft), gone, ident(soft), keys, forget)).fetchone()
        else:
            row = conn.execute(sql.SQL("WITH d AS (DELETE FROM {} t WHERE {} RETURNING {}){} SELECT count(*) FROM d").format(
                target, gone, keys, forget)).fetchone()
        deleted = int(row[0]) if row else 0
        total = 0
        if deleted:  # the guard's denominator, counted only when it is needed
            total_row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(target)).fetchone()
            total = int(total_row[0]) + (0 if soft else deleted) if total_row else 0
        before = max(total - inserted, 0)
        if before > 0 and deleted > plan.max_delete_fraction * before and plan.mode != "window":
            conn.rollback()
            raise QualityCheckFailed(
                f"refusing to delete {deleted} of {before} rows (over max_delete_fraction "
                f"{plan.max_delete_fraction}); nothing published", table=plan.table, deleted=deleted, total=before)

    for _name, definition in rebuilt:
        conn.execute(definition.encode())  # pg_get_indexdef output: quoted by PostgreSQL itself
    post = quality.published_checks(conn, target=target, staged=p.deduped(with_hash=p.hashes is not None), key=plan.key,
                                    distinct_staged=distinct, config=plan.checks,
                                    hashes=p.hashes)
    post += _reconciliation(conn, plan, target, soft)
    _record_and_gate(res, plan, audit_id, post, conn.rollback, "failed quality check after publish")

    watermark, future = _new_watermark(conn, plan, staging)
    if plan.repair:
        watermark = None  # a repair leaves the watermark where the nights left it
    result = PublishResult(
        rows_inserted=inserted, rows_updated=updated, rows_unchanged=distinct - inserted - updated + skipped,
        rows_deleted=deleted, duplicate_keys=staged - distinct, watermark=watermark, dry_run=dry_run,
        checks_failed_soft=[r.name for r in post if not r.ok and not r.hard],
        indexes_rebuilt=[name for name, _ in rebuilt], future_cursor_rows=future,
    )
    if dry_run:
        return result
    if not plan.repair:
        _advance_watermark(conn, plan, watermark, res.settings.schedule_anchor)
    conn.execute(sql.SQL("UPDATE {} SET status = 'completed', total_rows = %s,"
                         " checkpoint_data = checkpoint_data || %s WHERE id = %s").format(ckpt_table),
                 (staged, Jsonb({"published": result.model_dump(mode="json")}), plan.checkpoint_id))
    for leftover in load.run_tables(plan.staging_table):
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident(plan.staging_schema, leftover)))
    return result


FUTURE_TOLERANCE = timedelta(minutes=5)


def _new_watermark(conn: Any, plan: RefreshPlan, rows: sql.Composable) -> tuple[str | None, int]:
    """The watermark the rows read move to, never past the read snapshot (a future-dated cursor would push
    every later row out of every later read), and how many rows carry a cursor past it (+5 minutes)."""
    if not plan.cursor or not plan.cursor_type:
        return None, 0
    row = conn.execute(sql.SQL("SELECT max({})::text FROM {}").format(ident(plan.cursor), rows)).fetchone()
    highest = row[0] if row else None
    snapshot = datetime.fromisoformat(str(plan.session["snapshot_time"]))
    limit = extract.cursor_limit(plan.cursor_type, snapshot, plan.source_timezone, FUTURE_TOLERANCE)
    if limit is None or highest is None:
        return highest, 0
    future_row = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {} > {}::{}").format(
        rows, ident(plan.cursor), sql.Literal(str(limit)), sql.SQL(_pg_type(plan, plan.cursor)))).fetchone()
    future = int(future_row[0]) if future_row else 0
    return extract.cap_watermark(highest, plan.cursor_type, snapshot, plan.source_timezone), future


def _reconciliation(conn: Any, plan: RefreshPlan, target: sql.Composable, soft: str | None) -> list[quality.CheckResult]:
    """The target's rows per replaced period, or in all, against the source's at the read snapshot (hard).
    Nothing when the run's mode promises no count (incremental without deletes): no check row that proves nothing."""
    expected = dict(plan.expected_periods) if plan.expected_periods is not None else None
    scope = _repair_scope(plan) if plan.repair_keys is not None else None
    slices = (len(expected) if expected is not None else 0) + (1 if plan.expected_rows is not None else 0)
    if not slices:
        return []
    problems = reconcile.prove(conn, table=plan.table, target=target, window=plan.window_column,
                               pg_type=_pg_type(plan, plan.window_column) if plan.window_column else None,
                               expected_periods=expected, expected_rows=plan.expected_rows, live_only=soft,
                               scope=scope)
    return [quality.CheckResult(
        "reconciliation", float(len(problems)), 0.0, ok=not problems, hard="reconciliation" in plan.checks.hard,
        detail="; ".join(problems[:20]) + (f" (and {len(problems) - 20} more)" if len(problems) > 20 else "")
        if problems else f"{slices} slice(s) equal to the source's count")]


def _repair_scope(plan: RefreshPlan) -> sql.Composable:
    """The target rows of a repair's keys (alias t)."""
    assert plan.repair_keys is not None
    key_columns = [digest.DigestColumn(c.source_name, c.target_name, c.bq_type) for k in plan.key
                   for c in plan.columns if c.target_name == k]
    scope = digest.pg_key_scope(key_columns, plan.repair_keys, "t", {k: _pg_type(plan, k) for k in plan.key})
    assert scope is not None  # the plan named them in BigQuery
    return scope


def _advance_watermark(conn: Any, plan: RefreshPlan, watermark: str | None, anchor: time) -> None:
    """Move the watermark forward only (a full reload may set it afresh), with the registry's times."""
    current_row = conn.execute(
        sql.SQL("SELECT watermark FROM {} WHERE id = %s").format(ident(plan.registry_schema, "refresh_config")),
        (plan.config_id,),
    ).fetchone()
    current = current_row[0] if current_row else None
    new = current
    if watermark is not None:
        if current is None or plan.full:
            new = watermark
        else:
            assert plan.cursor_type is not None
            a = extract.parse_watermark(current, plan.cursor_type)
            b = extract.parse_watermark(watermark, plan.cursor_type)
            new = watermark if b > a else current
    conn.execute(
        sql.SQL("UPDATE {} SET watermark = %s, watermark_target = %s, source_schema = %s WHERE id = %s").format(
            ident(plan.registry_schema, "refresh_config")),
        (new, plan.target_label, Jsonb(plan.source_schema), plan.config_id),
    )
    now = conn.execute("SELECT now()").fetchone()
    assert now is not None
    registry.mark_refreshed(conn, plan.registry_schema, plan.config_id, now[0], anchor)


def discard_staging(res: Resources, plan: RefreshPlan, reason: str) -> None:
    """Drop a run's staging and expire its checkpoint (used when a run must start over)."""
    with res.target.connect() as conn:
        conn.execute(sql.SQL("UPDATE {} SET status = 'expired' WHERE id = %s").format(
            ident(plan.registry_schema, "refresh_checkpoints")), (plan.checkpoint_id,))
        for leftover in load.run_tables(plan.staging_table):
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident(plan.staging_schema, leftover)))
        conn.commit()
    log.info("%s: staging discarded (%s)", plan.table, reason)


def _with_hashes(plan: RefreshPlan) -> str:
    """The live rows joined with their kept hashes (column _bqr_row_hash), as a query."""
    assert plan.rowhash_table is not None
    cols = ", ".join(f"t.{quote_ident(c.target_name)}" for c in plan.columns)
    on = " AND ".join(f"r.{quote_ident(k)} = t.{quote_ident(k)}" for k in plan.key)
    return (f"SELECT {cols}, r.h AS {quote_ident(HASH_COLUMN)} FROM {quote_ident(plan.target_schema)}."  # noqa: S608
            f"{quote_ident(plan.target_table)} t JOIN {quote_ident(plan.staging_schema)}."
            f"{quote_ident(plan.rowhash_table)} r ON {on}")


def _load_direct(res: Resources, plan: RefreshPlan, read: Any, transform: Any, audit_id: int | None, *,
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

    # No checkpoint per batch here, so no reason for large batches: small ones keep each shaping thread's
    # copies (conform, shape, hash) small; the COPY is one stream whatever their size.
    cut = min(plan.batch_size, DIRECT_BATCH_ROWS)

    def producer(stream: str) -> Any:
        def produce(put: Any) -> None:
            pending: list[pa.RecordBatch] = []
            size = 0

            def flush() -> None:
                nonlocal pending, size
                if not pending:
                    return
                merged = pa.Table.from_batches(pending).combine_chunks().to_batches()[0]
                pending, size = [], 0
                shaped = shape(conform(merged, plan.columns), columns=plan.columns, key=plan.key,
                               cursor=plan.cursor, transform=transform)
                rows, _ = _split_unchanged(plan, shaped.rows, None)
                digest = _digest(plan, rows, check_names)
                with lock:
                    counters["read"] += merged.num_rows
                    counters["loaded"] += rows.num_rows
                    counters["quarantined"] += len(shaped.quarantined)
                    counters["batches"] += 1
                    counters["checksum"] = (counters["checksum"] + digest) % quality.MOD
                    quarantined.extend(shaped.quarantined)
                    progress.update(counters["read"])
                _warn_quarantined(plan, shaped.quarantined)
                put(rows.select(hashed_schema.names))

            for batch, _ in read(stream, 0, arrow_schema):
                while batch.num_rows:  # re-cut to exactly batch_size rows, as staging does
                    take = batch.slice(0, cut - size)
                    pending.append(take)
                    size += take.num_rows
                    batch = batch.slice(take.num_rows)
                    if size >= cut:
                        flush()
            flush()
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
        batches = fastpath.pipelined([producer(s) for s in plan.session["streams"]], depth=2, errors=failures)
        spill_schema = pa.schema([*(hashed_schema.field(k) for k in plan.key), pa.field("h", pa.int64())])
        spill = pa.ipc.new_file(spill_path, spill_schema) if spill_dir is not None else None

        def live_rows() -> Iterator[pa.RecordBatch]:
            for batch in batches:
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
                with pa.memory_map(spill_path) as source, adbc_conn.cursor() as cur:
                    spilled = pa.ipc.open_file(source)
                    cur.adbc_ingest(plan.rowhash_table, pa.RecordBatchReader.from_batches(
                        spilled.schema, (spilled.get_batch(i) for i in range(spilled.num_record_batches))),
                        mode="append", db_schema_name=plan.staging_schema)
            except Exception as exc:
                if "23505" in str(exc) or "duplicate key" in str(exc):  # as the live table's key would say below
                    raise fastpath.DirectLoadAbandoned("the source repeats a key", table=plan.table) from None
                raise
        for row in quarantined:
            session.execute(sql.SQL("INSERT INTO {} (audit_log_id, table_schema, table_name, reason, row_data)"
                                    " VALUES (%s, %s, %s, 'NULL in a key column', %s)").format(
                ident(plan.registry_schema, "refresh_quarantine")),
                (audit_id, plan.table.split(".")[0], plan.table.split(".", 1)[1],
                 Jsonb(row, dumps=lambda v: json.dumps(v, default=str))))
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
            verify_from=_with_hashes(plan) if plan.row_hash else None,
        )
        present = session.execute(sql.SQL("SELECT count(*) FROM {}").format(target)).fetchone()
        present_rows = int(present[0]) if present else -1
        results.append(quality.CheckResult("published_count", present_rows, counters["loaded"],
                                           ok=present_rows == counters["loaded"], hard="published_count" in plan.checks.hard,
                                           detail="rows loaded present in the live table"))
        results += _reconciliation(session, plan, target, None)
        _record_and_gate(res, plan, audit_id, results, adbc_conn.rollback, "failed quality check")
        record_phase(plan.table, "publishing")  # the indexes, the watermark and the COMMIT
        try:
            fastpath.rebuild_indexes(session, plan.target_schema, plan.target_table, dropped)
        except Exception as exc:
            if "23505" in str(exc) or "duplicate key" in str(exc) or "could not create unique index" in str(exc):
                raise fastpath.DirectLoadAbandoned("the source repeats a key", table=plan.table) from None
            raise
        watermark, future = _new_watermark(session, plan, target)
        _advance_watermark(session, plan, watermark, res.settings.schedule_anchor)
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
        session.execute(sql.SQL("UPDATE {} SET status = 'completed', total_rows = %s, checkpoint_data = checkpoint_data"
                                " || %s WHERE id = %s").format(ident(plan.registry_schema, "refresh_checkpoints")),
                        (counters["loaded"], Jsonb({"direct_load": manifest.model_dump(mode="json")}), plan.checkpoint_id))
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
