"""The weekly maintenance flow: checkpoints, log retention, the audit archive, orphaned staging, discovery."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger

from blocks.resources import resolve_resources
from bq_refresh.settings import load_settings
from tasks import maintenance


@flow(name="maintenance")
def maintenance_flow(retention_days: int | None = None, discover: bool = True,
                     log_retention_days: int | None = None) -> dict[str, Any]:
    """Weekly housekeeping.

    Expires checkpoints past their expiry; deletes completed and expired checkpoints, alert-log rows and
    view-refresh log rows older than ``log_retention_days``; moves audit rows older than ``retention_days``
    (with their quality and quarantine rows) to the archive tables; drops orphaned staging tables; and
    registers (disabled) new tables found in the BigQuery dataset.

    Args:
        retention_days: audit retention in days (default REFRESH_AUDIT_RETENTION_DAYS, 90).
        discover: look for new BigQuery tables.
        log_retention_days: checkpoint, alert and view-refresh log retention in days
            (default REFRESH_LOG_RETENTION_DAYS, 30).

    Returns:
        The report: how many rows each step expired, deleted or archived; tables dropped and discovered.
    """
    logger = get_run_logger()
    settings = load_settings()
    res = resolve_resources(settings)
    audit_days = settings.audit_retention_days if retention_days is None else retention_days
    log_days = settings.log_retention_days if log_retention_days is None else log_retention_days
    schema = settings.schema_name
    report = maintenance.MaintenanceReport()
    with res.target.connect(autocommit=True) as conn:
        report.checkpoints_expired = maintenance.expire_checkpoints(conn, schema)
        report.checkpoints_deleted = maintenance.delete_finished_checkpoints(conn, schema, log_days)
        report.alerts_deleted = maintenance.delete_old_alerts(conn, schema, log_days)
        report.view_refreshes_deleted = maintenance.delete_old_view_refreshes(conn, schema, log_days)
        archived = maintenance.archive_audit(conn, schema, audit_days)
        report.audit_rows_archived = archived.audit
        report.quality_rows_archived = archived.quality
        report.quarantine_rows_archived = archived.quarantine
        report.staging_tables_dropped = maintenance.drop_orphaned_staging(conn, schema, settings.staging_schema)
        report.rowhash_tables_dropped = maintenance.drop_orphaned_rowhashes(conn, schema, settings.staging_schema,
                                                                            settings.shadow_schema)
        if discover:
            report.tables_discovered = maintenance.discover_tables(conn, schema, res.source)
    logger.info("maintenance: %s", asdict(report))
    return asdict(report)
