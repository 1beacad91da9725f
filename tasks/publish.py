"""Publish staged rows into the live table in one transaction (merge, delete scope and guard, the
reconciliation, the watermark, the checkpoint closed); a publish group's tables together; staging discarded."""

from __future__ import annotations

import logging
from datetime import datetime, time, timedelta
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb

from blocks.resources import Resources
from bq_refresh.errors import (
    GroupHeld,
    QualityCheckFailed,
    StagingLost,
)
from tasks import checkpoints, extract, load, quality, reconcile, registry
from tasks.artifacts import record_phase
from tasks.gate import reconciliation, record_and_gate, repair_scope
from tasks.refresh_plan import PublishResult, RefreshPlan, discard_staging, pg_type, staging_lost
from tasks.sqlnames import ident, idents

log = logging.getLogger(__name__)


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
    ckpt = checkpoints.read(conn, plan.registry_schema, plan.checkpoint_id, lock=True)
    if ckpt is not None and ckpt.status == "completed" and "published" in ckpt.data:
        log.warning("%s: already published by an earlier attempt of this run (its COMMIT's answer was lost)",
                    plan.table)
        return PublishResult(**ckpt.data["published"])
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
    ckpt = checkpoints.read(conn, plan.registry_schema, plan.checkpoint_id, lock=True)
    if ckpt is None or ckpt.status != "active":
        conn.rollback()
        raise StagingLost(f"its checkpoint is {ckpt.status if ckpt else 'gone'}: the staged rows cannot be trusted;"
                          " nothing published, the next run starts over", table=plan.table)
    counts = conn.execute(
        sql.SQL("SELECT count(*), count(DISTINCT ({})) FROM {}").format(idents(plan.key), staging)
    ).fetchone()
    assert counts is not None
    staged, distinct = int(counts[0]), int(counts[1])
    skipped = int(ckpt.data.get("unchanged") or 0)
    lost = staging_lost(conn, plan.staging_schema, plan.staging_table, ckpt.data, ckpt.rows)
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
        delete_scope, source_keys = repair_scope(plan), staging
    elif plan.mode == "window":
        if plan.periods is not None and plan.window_column:  # every period in it was read whole
            delete_scope = reconcile.period_scope("t", plan.window_column, pg_type(plan, plan.window_column),
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
    post += reconciliation(conn, plan, target, soft)
    record_and_gate(res, plan, audit_id, post, conn.rollback, "failed quality check after publish")

    watermark, future = new_watermark(conn, plan, staging)
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
        advance_watermark(conn, plan, watermark, res.settings.schedule_anchor)
    checkpoints.complete(conn, plan.registry_schema, plan.checkpoint_id, staged,
                         {"published": result.model_dump(mode="json")})
    for leftover in load.run_tables(plan.staging_table):
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident(plan.staging_schema, leftover)))
    return result


FUTURE_TOLERANCE = timedelta(minutes=5)


def new_watermark(conn: Any, plan: RefreshPlan, rows: sql.Composable) -> tuple[str | None, int]:
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
        rows, ident(plan.cursor), sql.Literal(str(limit)), sql.SQL(pg_type(plan, plan.cursor)))).fetchone()
    future = int(future_row[0]) if future_row else 0
    return extract.cap_watermark(highest, plan.cursor_type, snapshot, plan.source_timezone), future


def advance_watermark(conn: Any, plan: RefreshPlan, watermark: str | None, anchor: time) -> None:
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
