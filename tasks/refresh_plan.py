"""Plan one table's refresh: the columns and their drift, the read (cursor floor, periods, keys) and its session,
the checkpoint (or an active one resumed once its staging is proven intact); the plan and result types."""

from __future__ import annotations

import base64
import hashlib
import logging
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pyarrow as pa
from psycopg import sql
from pydantic import BaseModel

from blocks.resources import Resources
from bq_refresh.errors import (
    ConfigError,
    SchemaDriftError,
    SourceError,
)
from tasks import checkpoints, digest, extract, fastpath, headroom, load, reconcile, rowhash
from tasks import restriction as rs
from tasks.artifacts import record_phase
from tasks.fastpath import LocalSource
from tasks.partitions import restrict
from tasks.planning import streams_within
from tasks.registry import RegistryEntry
from tasks.sources import earlier_result, over_budget, resolve_source, result_over_budget
from tasks.spec import QualityConfig, TableSpec
from tasks.sqlnames import ident
from tasks.transform import get_transform
from tasks.typemap import CURSOR_TYPES, Column, arrow_source_type, declared_form

log = logging.getLogger(__name__)


FUNCTION_NAME = "refresh_table"


MAX_SESSION_RECREATIONS = 3




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
        checkpoints.expire_overdue(conn, settings.schema_name)
        active = checkpoints.active(conn, settings.schema_name, FUNCTION_NAME, entry.table_schema, entry.table_name)
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
                                         repair_periods, repair_keys, rowhash.VERSION)).encode()).hexdigest()
        restarted = None
        if active is not None:
            unreadable = _restriction_unreadable(active.data.get("session") or {})
            why = (unreadable if unreadable
                   else "the plan changed" if active.data.get("fingerprint") != fingerprint
                   else (None if local is not None else result_gone(active.data.get("plan", {}), source)
                         or _snapshot_gone(res, source.ref, active.data))
                   or staging_lost(conn, staging_schema, stage_table, active.data, active.rows))
            if why:
                log.warning("%s: the unfinished run is not resumed (%s); starting over", table, why)
                restarted = f"the unfinished run of checkpoint {active.id} is not resumed: {why}"
                checkpoints.expire(conn, settings.schema_name, active.id)
                active = None
        if active is None and source.reused:  # the earlier job's result was for the run that is not resumed
            source = resolve_source(res.source, table=table, source_ref=spec.source, query=spec.query,
                                    materialization_dataset=spec.materialization_dataset,
                                    maximum_bytes_billed=budget, dry_run=dry_run)
        if active is not None:
            conn.commit()
            return RefreshPlan(**active.data["plan"], checkpoint_id=active.id, resumed=True,
                               rows_already_staged=active.rows, session=active.data["session"])

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
            if local is None:  # in-process batches are read whole
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
        session_data = {**session_dict(session), "restriction": rs.to_json(restriction if local is None else rs.EVERY_ROW)}
        plan_json = RefreshPlan(**plan_fields, checkpoint_id=0, resumed=False, rows_already_staged=0,
                                session=session_data).model_dump(mode="json")
        stored_plan = {k: v for k, v in plan_json.items()
                       if k not in {"checkpoint_id", "resumed", "rows_already_staged", "session", "restarted"}}
        checkpoint_id = checkpoints.create(
            conn, settings.schema_name, function_name=FUNCTION_NAME, table_schema=entry.table_schema,
            table_name=entry.table_name, ttl_hours=settings.checkpoint_ttl_hours,
            data={"fingerprint": fingerprint, "plan": stored_plan, "session": session_data,
                  "offsets": session.offsets, "done": {}})
        conn.commit()
        return RefreshPlan(**plan_fields, checkpoint_id=checkpoint_id, resumed=False, rows_already_staged=0,
                           session=session_data, restarted=restarted)


def _earlier_result(res: Resources, entry: RegistryEntry, spec: TableSpec) -> extract.SourceTable | None:
    """The result table of the query job of this table's unfinished run (a query or view source), found by the
    job's id: the resumed run reads what its checkpoint counts, without running (and paying for) the query again."""
    with res.target.connect(autocommit=True) as conn:
        active = checkpoints.active(conn, res.settings.schema_name, FUNCTION_NAME, entry.table_schema,
                                    entry.table_name, unexpired=True)
    plan = active.data.get("plan") if active else None
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


def staging_lost(conn: Any, staging_schema: str, stage_table: str, data: dict[str, Any], staged: int) -> str | None:
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


def _restriction_unreadable(session: dict[str, Any]) -> str | None:
    """Why a checkpoint's row restriction cannot be read back as data (None: it can): then it is not resumed."""
    if "restriction" not in session:
        return "its checkpoint keeps its row restriction as SQL text (written by an earlier version)"
    try:
        rs.from_json(session["restriction"])
    except ValueError as exc:
        return f"its checkpoint's row restriction is not one this version writes ({exc})"
    return None


def session_dict(session: extract.ReadSessionInfo) -> dict[str, Any]:
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


def pg_type(plan: RefreshPlan, column: str) -> str:
    return next(c.pg_type for c in plan.columns if c.target_name == column)


def plan_source(plan: RefreshPlan) -> extract.SourceTable:
    """The source a plan reads, as read sessions need it (no schema: the plan's columns have it)."""
    return extract.SourceTable(plan.source_ref, [], job_result=plan.source_job_result,
                               partition_filter=plan.source_partition_filter)

def discard_staging(res: Resources, plan: RefreshPlan, reason: str) -> None:
    """Drop a run's staging and expire its checkpoint (used when a run must start over)."""
    with res.target.connect() as conn:
        checkpoints.expire(conn, plan.registry_schema, plan.checkpoint_id)
        for leftover in load.run_tables(plan.staging_table):
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident(plan.staging_schema, leftover)))
        conn.commit()
    log.info("%s: staging discarded (%s)", plan.table, reason)
