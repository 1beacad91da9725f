"""The weekly maintenance flow: checkpoints, audit retention, orphaned staging, table discovery."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger

from blocks.resources import resolve_resources
from bq_refresh.settings import load_settings
from tasks import maintenance


@flow(name="maintenance")
def maintenance_flow(retention_days: int = 90, discover: bool = True) -> dict[str, Any]:
    """Expire checkpoints, purge audit rows older than ``retention_days``, drop orphaned staging
    tables, and register (disabled) new tables found in the BigQuery dataset."""
    logger = get_run_logger()
    settings = load_settings()
    res = resolve_resources(settings)
    report = maintenance.MaintenanceReport()
    with res.target.connect(autocommit=True) as conn:
        report.checkpoints_expired = maintenance.expire_checkpoints(conn, settings.schema_name)
        report.audit_rows_purged = maintenance.purge_audit(conn, settings.schema_name, retention_days)
        report.staging_tables_dropped = maintenance.drop_orphaned_staging(conn, settings.schema_name,
                                                                          settings.staging_schema)
        if discover:
            report.tables_discovered = maintenance.discover_tables(conn, settings.schema_name, res.source)
    logger.info("maintenance: %s", asdict(report))
    return asdict(report)
