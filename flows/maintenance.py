"""The weekly maintenance flow: checkpoints, log retention, the audit archive, orphaned staging, discovery."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger

from blocks.resources import Resources, resolve_resources
from bq_refresh.errors import RefreshError
from bq_refresh.settings import load_settings
from flows import runlog
from tasks import maintenance, quality
from tasks.alerts import Alert, send_alert
from tasks.registry import list_entries

runlog.attach()


@flow(name="maintenance")
def maintenance_flow(retention_days: int | None = None, discover: bool = True,
                     log_retention_days: int | None = None, verify: bool = True, repair: bool = False,
                     verify_max_bytes: int | None = None) -> dict[str, Any]:
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
        verify: compare every enabled table with its source, slice by slice (tasks/verify.py); a table that
            differs is recorded (refresh_data_quality ``verify:<table>``) and alerted (``copy_differs``).
        repair: reload what differs in every table (else only in tables whose ``auto_repair`` is on), then
            verify again.
        verify_max_bytes: budget of one of verify's BigQuery queries (verify --max-bytes); none by default.

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
    if verify:
        report.verified, report.repaired = verify_all(res, repair=repair, max_bytes=verify_max_bytes)
    logger.info("maintenance: %s", asdict(report))
    return asdict(report)


def verify_all(res: Resources, *, repair: bool, max_bytes: int | None = None) -> tuple[dict[str, str], list[str]]:
    """Verify every enabled table (each under its lock; a table whose run is active is left for next week);
    repair where asked; record and alert each difference.

    Returns:
        table -> its verdict's status (equal, differs, not_verified), and the tables repaired.
    """
    from flows.refresh_table import refresh_table
    from tasks.verify import repair_table, verify_table

    logger = get_run_logger()
    schema = res.settings.schema_name
    with res.target.connect(autocommit=True) as conn:
        entries = [e for e in list_entries(conn, schema) if e.is_enabled]
    verified: dict[str, str] = {}
    repaired: list[str] = []
    for entry in entries:
        try:
            mend = repair or entry.spec().auto_repair
            verdict = verify_table(res, entry, rows=mend, max_bytes=max_bytes)  # rows located: repaired by key
            if verdict.status == "differs" and mend:
                run = repair_table(res, entry, verdict, refresh_table)
                repaired.append(entry.name)
                verdict = verify_table(res, entry, max_bytes=max_bytes)
                verdict.notes.insert(0, f"repaired ({run.get('status')}: {run.get('repaired')}), verified again")
        except RefreshError as exc:  # one table's source or target unreadable: the others are still verified
            logger.warning("verify %s: %s", entry.name, exc)
            verified[entry.name] = "not_verified"
            continue
        verified[entry.name] = verdict.status
        slices = [d["slice"] for d in verdict.differing]
        with res.target.connect(autocommit=True) as conn:
            quality.record(conn, schema, None, [quality.CheckResult(
                f"verify:{entry.name}", float(len(slices)), 0.0, ok=verdict.status == "equal", hard=False,
                detail="; ".join(verdict.notes))])
            if verdict.status == "differs":
                shown = ", ".join(str(s) for s in slices[:10]) + (f" and {len(slices) - 10} more" if len(slices) > 10 else "")
                send_alert(res.settings, Alert(
                    "copy_differs", "differs", entry.name,
                    f"{entry.name}: {len(slices)} slice(s) by {verdict.slicing} differ from BigQuery: {shown}"
                    " (bq-refresh verify --rows lists the rows; --repair reloads them)",
                    counts={"source_rows": verdict.source_rows, "target_rows": verdict.target_rows},
                    details={"slicing": verdict.slicing, "slices": verdict.differing[:50], "notes": verdict.notes}), conn)
        logger.info("verify %s: %s (%d slices, %d differ)", entry.name, verdict.status, verdict.slices, len(slices))
    return verified, repaired
