"""The per-table subflow: lock, plan, stage, publish, audit."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blocks.resources import Resources, resolve_resources
from bq_refresh.errors import AlreadyRunning
from bq_refresh.settings import load_settings
from tasks import sync
from tasks.audit import finish_audit, start_audit
from tasks.locks import table_lock
from tasks.registry import get_entry


def _resources() -> Resources:
    return resolve_resources(load_settings())


@task(name="plan", cache_policy=NO_CACHE)
def plan_task(table: str, full_refresh: bool, batch_size: int | None) -> sync.RefreshPlan:
    res = _resources()
    with res.target.connect() as conn:
        entry = get_entry(conn, res.settings.schema_name, table)
    return sync.plan_refresh(res, entry, full_refresh=full_refresh, batch_size=batch_size)


@task(name="stage", cache_policy=NO_CACHE)
def stage_task(plan: sync.RefreshPlan, audit_id: int) -> sync.StageManifest:
    return sync.stage_rows(_resources(), plan, audit_id=audit_id)


@task(name="publish", cache_policy=NO_CACHE)
def publish_task(plan: sync.RefreshPlan, dry_run: bool) -> sync.PublishResult:
    res = _resources()
    result = sync.publish(res, plan, dry_run=dry_run)
    if dry_run:
        sync.discard_staging(res, plan, "dry run")
    return result


@flow(name="refresh-table")
def refresh_table(
    table: str,
    full_refresh: bool = False,
    dry_run: bool = False,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Refresh one registered table from BigQuery, exactly once, resumably.

    Args:
        table: registry name, "schema.table" or a table of the default schema.
        full_refresh: re-read the whole source and replace the table's contents.
        dry_run: do everything except publishing; report what would change.
        batch_size: rows per COPY batch and checkpoint (default: the table's or REFRESH_BATCH_SIZE).

    Returns:
        A summary: status, mode, rows read/inserted/updated/deleted, audit id.
    """
    logger = get_run_logger()
    res = _resources()
    schema = res.settings.schema_name
    with res.target.connect(autocommit=True) as audit_conn:
        entry = get_entry(audit_conn, schema, table)
        try:
            lock = table_lock(res.target, entry.name, res.settings.lock_wait_s)
            lock.__enter__()
        except AlreadyRunning as exc:
            audit_id = start_audit(audit_conn, schema, config_id=entry.id, table_schema=entry.table_schema,
                                   table_name=entry.table_name)
            finish_audit(audit_conn, schema, audit_id, status="skipped", error=exc)
            logger.warning("%s", exc)
            return {"table": entry.name, "status": "skipped", "reason": str(exc), "audit_id": audit_id}
        try:
            audit_id = start_audit(audit_conn, schema, config_id=entry.id, table_schema=entry.table_schema,
                                   table_name=entry.table_name, metadata={"dry_run": dry_run, "full_refresh": full_refresh})
            try:
                plan = plan_task(entry.name, full_refresh, batch_size)
                manifest = stage_task(plan, audit_id)
                result = publish_task(plan, dry_run)
            except BaseException as exc:
                finish_audit(audit_conn, schema, audit_id, status="failed", error=exc)
                raise
            status = "warning" if manifest.rows_quarantined or result.duplicate_keys else "success"
            metadata = {
                "mode": plan.mode, "full": plan.full, "dry_run": dry_run, "watermark_from": plan.watermark_from,
                "watermark_to": result.watermark, "read_session": manifest.read_session, "batches": manifest.batches,
                "resumed": plan.resumed, "resumed_from_rows": manifest.resumed_from_rows,
                "session_recreated": manifest.session_recreated, "rows_unchanged": result.rows_unchanged,
                "duplicate_keys": result.duplicate_keys, "rows_quarantined": manifest.rows_quarantined,
                "drift": plan.drift, "target_created": plan.target_created,
            }
            finish_audit(
                audit_conn, schema, audit_id, status=status, rows_processed=manifest.rows_read,
                rows_inserted=result.rows_inserted, rows_updated=result.rows_updated, rows_deleted=result.rows_deleted,
                bigquery_job_id=plan.bigquery_job_id or manifest.read_session, metadata=metadata,
            )
        finally:
            lock.__exit__(None, None, None)
    logger.info("%s %s: read %d, inserted %d, updated %d, deleted %d", entry.name, status, manifest.rows_read,
                result.rows_inserted, result.rows_updated, result.rows_deleted)
    return {"table": entry.name, "status": status, "audit_id": audit_id, "rows_read": manifest.rows_read,
            "rows_inserted": result.rows_inserted, "rows_updated": result.rows_updated,
            "rows_deleted": result.rows_deleted, **{k: v for k, v in metadata.items() if k != "drift"},
            "drift": plan.drift}
