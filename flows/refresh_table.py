"""The per-table subflow: lock, plan, stage, publish, audit; hooks send alerts and close crashed runs."""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any

import psycopg
from prefect import Flow, flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import FlowRun, State
from prefect.runtime import flow_run as current_flow_run

from blocks.resources import Resources, resolve_resources
from bq_refresh.errors import (
    AlreadyRunning,
    ConfigError,
    QualityCheckFailed,
    RefreshError,
    SchemaDriftError,
    name_failure,
)
from bq_refresh.settings import load_settings
from flows import runlog
from flows.automations import mark_alerted
from tasks import sync
from tasks.alerts import Alert, send_alert
from tasks.artifacts import publish_table_artifact
from tasks.audit import (
    audit_id_of_flow_run,
    close_interrupted_audits,
    close_running_audit,
    finish_audit,
    last_status,
    mark_views_failed,
    start_audit,
)
from tasks.deadline import worth_retrying
from tasks.load import analyze_after_publish
from tasks.locks import table_lock
from tasks.preflight import require_session_state
from tasks.registry import get_entry, list_entries
from tasks.status import checks_passed

runlog.attach()


def _resources() -> Resources:
    return resolve_resources(load_settings())


def _retry_transient(task: Any, task_run: Any, state: State[Any]) -> bool:
    """Retry only errors a retry may cure; drift, failed checks and bad config fail at once, and so does a BigQuery
    that gave no answer for BIGQUERY_TIMEOUT_SECONDS (its retries already spent the one budget: tasks/deadline.py)."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - classification of the task's own failure
        return worth_retrying(exc)
    return False


@task(name="plan", cache_policy=NO_CACHE, retry_condition_fn=_retry_transient, task_run_name="plan-{table}")
def plan_task(table: str, full_refresh: bool, batch_size: int | None, dry_run: bool = False,
              allow_deletes: bool = False, repair_periods: list[str | None] | None = None,
              repair_keys: list[list[str | None]] | None = None) -> sync.RefreshPlan:
    res = _resources()
    with res.target.connect() as conn:
        entry = get_entry(conn, res.settings.schema_name, table)
    return sync.plan_refresh(res, entry, full_refresh=full_refresh, batch_size=batch_size, dry_run=dry_run,
                             allow_deletes=allow_deletes, repair_periods=repair_periods, repair_keys=repair_keys)


@task(name="stage", cache_policy=NO_CACHE, retry_condition_fn=_retry_transient, task_run_name="stage-{plan.table}")
def stage_task(plan: sync.RefreshPlan, audit_id: int) -> sync.StageManifest:
    # A retry resumes from the checkpoint: batches already committed are not read again.
    return sync.stage_rows(_resources(), plan, audit_id=audit_id)


@task(name="check", cache_policy=NO_CACHE, retry_condition_fn=_retry_transient, task_run_name="check-{plan.table}")
def check_task(plan: sync.RefreshPlan, audit_id: int) -> list[str]:
    """The quality gate on staged rows; returns the names of failed soft checks (hard ones raise)."""
    results = sync.check_staged(_resources(), plan, audit_id=audit_id)
    return [r.name for r in results if not r.ok]


@task(name="publish", cache_policy=NO_CACHE, retry_condition_fn=_retry_transient,
      task_run_name="publish-{plan.table}")
def publish_task(plan: sync.RefreshPlan, dry_run: bool, audit_id: int) -> sync.PublishResult:
    res = _resources()
    result = sync.publish(res, plan, dry_run=dry_run, audit_id=audit_id)
    if dry_run:
        sync.discard_staging(res, plan, "dry run")
    return result


def _with_retries(t: Any, retries: int, delay_s: float) -> Any:
    delays = [delay_s * 2**i for i in range(retries)] if retries else 0
    return t.with_options(retries=retries, retry_delay_seconds=delays, retry_jitter_factor=0.5 if retries else None)


def _rejected_message(plan: sync.RefreshPlan, manifest: sync.StageManifest, result: sync.PublishResult) -> str:
    parts = []
    if manifest.rows_quarantined:
        parts.append(f"{manifest.rows_quarantined} row(s) with NULL in key column(s) {', '.join(plan.key)} quarantined"
                     f" (table {plan.registry_schema}.refresh_quarantine)")
    if result.duplicate_keys:
        parts.append(f"{result.duplicate_keys} duplicate key row(s) on ({', '.join(plan.key)}) dropped"
                     + (f", the latest {plan.cursor} kept" if plan.cursor else ""))
    return f"{plan.table}: " + "; ".join(parts)


def _flow_run_url(flow_run_id: str | None) -> str | None:
    base = load_settings().prefect_ui_url
    return f"{base.rstrip('/')}/runs/flow-run/{flow_run_id}" if base and flow_run_id else None


def _on_failure(flow: Flow[Any, Any], flow_run: FlowRun, state: State[Any]) -> None:
    """Close an audit row a crash, cancellation or timeout left running, and alert. Never raises."""
    try:
        settings = load_settings()
        res = resolve_resources(settings)
        table = str(flow_run.parameters.get("table"))
        error: BaseException | None = None
        try:
            state.result()
        except BaseException as exc:  # noqa: BLE001
            error = exc
        if isinstance(error, RefreshError) and error.table:
            table = error.table  # the registry name, "schema.table"
        message = str(error) if error is not None else (state.message or state.type.value)
        details: dict[str, Any] = {}
        with res.target.connect(autocommit=True) as conn:
            group = next((e.publish_group for e in list_entries(conn, settings.schema_name) if e.name == table), None)
        if group is not None and flow_run.parameters.get("hold_publish"):
            # One alert for the group: this member's, naming the group its failure holds.
            details["publish_group"] = group
            message += f" [publish group {group!r} held: its tables keep their previous data]"
        event = "table_failed"
        if isinstance(error, SchemaDriftError):
            event = "schema_drift"
        elif isinstance(error, QualityCheckFailed):
            event = "quality_check_failed"
        with res.target.connect(autocommit=True) as conn:
            close_running_audit(conn, settings.schema_name, str(flow_run.id), f"{state.type.value}: {message}")
            deliveries = send_alert(settings, Alert(
                event=event, status=state.type.value.lower(), table=table, error=message[:2000],
                flow_run_id=str(flow_run.id), flow_run_url=_flow_run_url(str(flow_run.id)), details=details,
                audit_log_id=audit_id_of_flow_run(conn, settings.schema_name, str(flow_run.id)),
            ), conn)
        if any(d.delivered for d in deliveries):  # reported: the failure automation leaves this run to us
            mark_alerted(flow_run.id, flow_run.flow_id, flow.name)
    except Exception as exc:  # noqa: BLE001 - a failing hook logs and never hides the run's outcome
        import logging

        logging.getLogger(__name__).warning("refresh-table failure hook failed: %s", exc)


@task(name="views", cache_policy=NO_CACHE, retry_condition_fn=_retry_transient)
def views_task(changed: list[str], probe: list[str]) -> list[dict[str, Any]]:
    """Refresh the materialized views downstream of changed tables, in order; probe every dependent view."""
    from tasks.views import as_dicts, refresh_dependents

    res = _resources()
    with res.target.connect(autocommit=True) as conn:
        return as_dicts(refresh_dependents(conn, res.settings.schema_name, changed, probe))


def report_view_failures(views: list[dict[str, Any]], runs: dict[str, dict[str, Any]], run_id: str | None) -> list[str]:
    """Make failed dependent views part of the night: one ``view_refresh_failed`` alert per view (naming the
    table it reads and that table's audit row), and the runs of the tables it reads marked
    REFRESH_VIEW_FAILURE_STATUS with the failures in their audit rows (so /health and status show them).

    Args:
        views: what ``views_task`` returned.
        runs: target ("schema.table" the views read) -> that table's run summary (updated in place: status,
            views_failed).
        run_id: the flow run that refreshed the views.

    Returns:
        The registry names of the tables whose run ended failed because of a view.
    """
    from tasks.views import failed, view_tables

    broken = failed(views)
    if not broken:
        return []
    settings = load_settings()
    res = resolve_resources(settings)
    schema = settings.schema_name
    per_table: dict[str, list[dict[str, Any]]] = {}
    with res.target.connect(autocommit=True) as conn:
        owners = view_tables(conn, [v["view"] for v in broken], list(runs))
        for v in broken:
            failure = {"view": v["view"], "kind": v["kind"], "refreshed": v["refreshed"], "error": v["error"]}
            targets = owners.get(v["view"]) or []
            for target in targets:
                per_table.setdefault(target, []).append(failure)
            run = runs[targets[0]] if targets else {}
            send_alert(settings, Alert(
                "view_refresh_failed", settings.view_failure_status, run.get("table"),
                f"{v['view']}: {v['error'] or 'not queryable'}", run_id, _flow_run_url(run_id), {},
                {"view": v["view"], "kind": v["kind"], "refreshed": v["refreshed"],
                 "tables": [runs[t].get("table") for t in targets]},
                audit_log_id=run.get("audit_id")), conn)
        failed_tables = []
        for target, failures in per_table.items():
            run = runs[target]
            if run.get("audit_id") is not None:
                run["status"] = mark_views_failed(conn, schema, int(run["audit_id"]), settings.view_failure_status,
                                                  failures)
            else:
                run["status"] = settings.view_failure_status
            run["views_failed"] = failures
            if run["status"] == "failed" and not run.get("error"):
                run["error"] = "dependent view(s) failed: " + ", ".join(f["view"] for f in failures)
            if run["status"] == "failed":
                failed_tables.append(str(run["table"]))
    get_run_logger().warning("dependent views failed: %s", [(v["view"], v["error"]) for v in broken])
    return failed_tables


def _wait_for_source(res: Resources, table: str, condition: Any) -> Any:
    """Wait (re-checking BigQuery's table metadata) until the source is ready or the deadline passes."""
    from datetime import UTC, datetime

    from tasks.freshness import last_data_as_of
    from tasks.readiness import marker_name, read_state, wait_until_ready

    with res.target.connect(autocommit=True) as conn:
        last_read = last_data_as_of(conn, res.settings.schema_name, table)
    with res.target.connect(autocommit=True) as conn:
        spec = get_entry(conn, res.settings.schema_name, table).spec()
    client = res.source.get_bigquery_client()
    source_ref = res.source.table_ref(spec.source) if spec.source else None
    marker = res.source.table_ref(marker_name(condition.marker_table, datetime.now(UTC))) if condition.marker_table else None
    return wait_until_ready(condition, lambda: read_state(client, source_ref, marker), last_read=last_read)


def _note_empty_read(res: Resources, table: str, rows_read: int, run_id: str | None, audit_id: int) -> None:
    """Without a readiness condition: a read of nothing from a source unchanged for REFRESH_SOURCE_STALE_HOURS
    alerts source_stale once (until the source gives rows again)."""
    from datetime import UTC, datetime

    from tasks.freshness import close_episode, open_episode
    from tasks.readiness import source_modified, source_stale_without_condition

    settings = res.settings
    with res.target.connect(autocommit=True) as conn:
        spec = get_entry(conn, settings.schema_name, table).spec()
        if rows_read > 0 or spec.readiness is not None or spec.source is None:
            close_episode(conn, settings.schema_name, table, "source_stale")
            return
        modified = source_modified(res.source.get_bigquery_client(), res.source.table_ref(spec.source))
        if not source_stale_without_condition(rows_read, modified, datetime.now(UTC), settings.source_stale_hours):
            return
        assert modified is not None
        facts = {"source_modified": modified.isoformat(), "source_stale_hours": settings.source_stale_hours}
        if open_episode(conn, settings.schema_name, table, "source_stale", facts):
            send_alert(settings, Alert(
                "source_stale", "success", table,
                f"{table}: read 0 rows; the source was last modified {modified.isoformat()}, over"
                f" {settings.source_stale_hours:g} h ago: not loaded?", run_id, _flow_run_url(run_id), {}, facts,
                audit_log_id=audit_id), conn)


# Runs are named after their table (the parent passes registry names, "schema.table"), so that the Prefect UI
# shows which table each run refreshed. The summary is persisted: a parent that started this run through its
# deployment (scale-out) reads it from the result storage (Prefect's local storage on one host; shared storage,
# PREFECT_DEFAULT_RESULT_STORAGE_BLOCK, across hosts).
@flow(name="refresh-table", flow_run_name="{table}", on_failure=[_on_failure], on_crashed=[_on_failure],
      on_cancellation=[_on_failure], persist_result=True)
def refresh_table(
    table: str,
    full_refresh: bool = False,
    dry_run: bool = False,
    batch_size: int | None = None,
    refresh_views: bool = True,
    allow_deletes: bool = False,
    hold_publish: bool = False,
    repair_periods: list[str | None] | None = None,
    repair_keys: list[list[str | None]] | None = None,
) -> dict[str, Any]:
    """Refresh one registered table from BigQuery, exactly once, resumably.

    Args:
        table: registry name, "schema.table" or a table of the default schema.
        full_refresh: re-read the whole source and replace the table's contents.
        dry_run: do everything except publishing; report what would change.
        batch_size: rows per COPY batch and checkpoint (default: the table's or REFRESH_BATCH_SIZE).
        refresh_views: refresh the materialized views downstream when data changed (the parent flow
            does it once for all tables instead).
        allow_deletes: window mode: delete more vanished periods than the table's max_vanished_periods.
        hold_publish: stage and check only, and return ``status: staged`` with the plan; the parent flow
            publishes the table with the other members of its publish group (``publish_group``).
        repair_periods: window mode: re-read exactly these periods whole and replace them, no row skipped by
            its hash (``bq-refresh verify --repair``).
        repair_keys: re-read exactly these keys (the key columns' canonical texts, in key order) and replace
            exactly them (``bq-refresh verify --repair`` below a size). A repair run leaves the watermark, the
            refresh time and the table's freshness as the nights left them.

    Returns:
        A summary: status, mode, rows read/inserted/updated/deleted, audit id.
    """
    logger = get_run_logger()
    res = _resources()
    settings = res.settings
    schema = settings.schema_name
    run_id = str(current_flow_run.id) if current_flow_run.id else None
    started = time.monotonic()
    # Audit writes open a short connection each: a run that lost its connections (PostgreSQL restarted)
    # can still record its outcome once the server is back.
    audit = res.target.connect
    require_session_state(res.target)  # before anything is touched: a transaction pooler is refused
    with audit(autocommit=True) as conn:
        entry = get_entry(conn, schema, table)
        previous = last_status(conn, schema, entry.table_schema, entry.table_name)
    group = entry.publish_group
    if group is not None and not hold_publish:
        raise ConfigError(f"in publish group {group!r}, whose tables publish together: run it through the nightly"
                          f" flow (bq-refresh run --table {entry.name} refreshes the whole group)", table=entry.name)
    with ExitStack() as held_for_the_run:
        try:
            held = held_for_the_run.enter_context(table_lock(res.target, entry.name, settings.lock_wait_s))
        except AlreadyRunning as exc:
            with audit(autocommit=True) as conn:
                audit_id = start_audit(conn, schema, config_id=entry.id, table_schema=entry.table_schema,
                                       table_name=entry.table_name, metadata={"flow_run_id": run_id})
                finish_audit(conn, schema, audit_id, status="skipped", error=exc)
            logger.warning("%s", exc)
            return {"table": entry.name, "status": "skipped", "reason": str(exc), "audit_id": audit_id}
        with audit(autocommit=True) as conn:
            audit_id = start_audit(conn, schema, config_id=entry.id, table_schema=entry.table_schema,
                                   table_name=entry.table_name,
                                   metadata={"dry_run": dry_run, "full_refresh": full_refresh, "flow_run_id": run_id,
                                             **({"repair_periods": repair_periods} if repair_periods is not None else {}),
                                             **({"repair_keys": len(repair_keys)} if repair_keys is not None else {})})
            interrupted = close_interrupted_audits(conn, schema, entry.table_schema, entry.table_name, audit_id)
        if interrupted:
            logger.warning("%s: %d earlier run(s) had been interrupted; closed their audit rows", entry.name, interrupted)
        readiness = entry.spec().readiness
        if readiness is not None and not dry_run:
            waited = _wait_for_source(res, entry.name, readiness)
            if not waited.ready:
                modified = waited.source_modified.isoformat() if waited.source_modified else "unknown"
                facts = {"reason": "source not ready", "readiness": waited.reason, "source_modified": modified,
                         "readiness_checks": waited.checks, "waited_s": round(waited.waited_s, 1)}
                with audit(autocommit=True) as conn:
                    finish_audit(conn, schema, audit_id, status="skipped", metadata=facts)
                    send_alert(settings, Alert(
                        "source_stale", "skipped", entry.name,
                        f"{entry.name}: source not ready after {readiness.wait_minutes:g} min ({waited.reason});"
                        f" source last modified {modified}; not refreshed tonight",
                        run_id, _flow_run_url(run_id), {}, facts, audit_log_id=audit_id), conn)
                logger.warning("%s skipped: source not ready (%s)", entry.name, waited.reason)
                return {"table": entry.name, "status": "skipped", **facts,
                        "reason": f"source not ready: {waited.reason}", "audit_id": audit_id}
        try:
            plan = _with_retries(plan_task, settings.retries, settings.retry_delay_s)(
                entry.name, full_refresh, batch_size, dry_run, allow_deletes, repair_periods, repair_keys)
            held.ensure()
            manifest = _with_retries(stage_task, settings.retries, settings.retry_delay_s)(plan, audit_id)
            held.ensure()
            if manifest.published is not None:  # a direct initial load checked and published as it loaded
                result = manifest.published
                soft_failures = list(result.checks_failed_soft)
            else:
                soft_failures = _with_retries(check_task, settings.retries, settings.retry_delay_s)(plan, audit_id)
                held.ensure()
                if hold_publish:
                    logger.info("%s staged and checked; published with its group %r", entry.name, group)
                    return {"table": entry.name, "status": "staged", "publish_group": group, "audit_id": audit_id,
                            "plan": plan.model_dump(mode="json"), "manifest": manifest.model_dump(mode="json"),
                            "soft_failures": soft_failures, "previous": previous, "interrupted": interrupted,
                            "lock_reacquired": held.reacquired, "started_at": time.time() - (time.monotonic() - started),
                            "flow_run_id": run_id}
                result = _with_retries(publish_task, settings.retries, settings.retry_delay_s)(plan, dry_run, audit_id)
                soft_failures += result.checks_failed_soft
        except BaseException as exc:
            named = name_failure(exc, entry.name)
            recorded: BaseException = named
            if not str(named).strip():  # a timeout or cancellation carries no text: say what stopped the table
                recorded = RefreshError(
                    f"{type(exc).__name__}: the run of {entry.name} was stopped after"
                    f" {time.monotonic() - started:.0f} s (REFRESH_TABLE_TIMEOUT_SECONDS={settings.table_timeout_s:g},"
                    " or a cancellation); it resumes from its checkpoint on the next run", table=entry.name)
            try:
                with audit(autocommit=True) as conn:
                    finish_audit(conn, schema, audit_id, status="failed", error=recorded)
            except psycopg.Error as audit_exc:  # the database is gone: the next run closes the row as interrupted
                logger.warning("%s: could not record the failure in audit row %d: %s", entry.name, audit_id,
                               type(audit_exc).__name__)
            if named is exc:
                raise
            raise named from exc
        elapsed_ms = int((time.monotonic() - started) * 1000)
        summary = finish_run(res, entry.name, plan, manifest, result, soft_failures, audit_id=audit_id,
                             interrupted=interrupted, lock_reacquired=held.reacquired, elapsed_ms=elapsed_ms,
                             dry_run=dry_run)
    return announce_run(res, summary, plan, manifest, result, previous=previous, run_id=run_id, dry_run=dry_run,
                        refresh_views=refresh_views)


def finish_run(res: Resources, table: str, plan: sync.RefreshPlan, manifest: sync.StageManifest,
               result: sync.PublishResult, soft_failures: list[str], *, audit_id: int, interrupted: int,
               lock_reacquired: int, elapsed_ms: int, dry_run: bool) -> dict[str, Any]:
    """Close a published run's audit row (success, or warning when something needs a look); its summary.
    Called while the table's lock is held (a run that started meanwhile would close an open row as interrupted)."""
    settings = res.settings
    slow = elapsed_ms > settings.timeout_warning_ms
    warn = manifest.rows_quarantined or result.duplicate_keys or slow or soft_failures or result.future_cursor_rows
    status = "warning" if warn else "success"
    metadata = {
        "mode": plan.mode, "full": plan.full, "dry_run": dry_run, "watermark_from": plan.watermark_from,
        "watermark_to": result.watermark, "read_session": manifest.read_session, "batches": manifest.batches,
        "resumed": plan.resumed, "resumed_from_rows": manifest.resumed_from_rows,
        "session_recreated": manifest.session_recreated, "rows_unchanged": result.rows_unchanged,
        "duplicate_keys": result.duplicate_keys, "rows_quarantined": manifest.rows_quarantined,
        "drift": plan.drift, "target_created": plan.target_created, "slow": slow,
        "checks_warned": soft_failures, "shadow": plan.shadow, "target": plan.target_label,
        "indexes_rebuilt": result.indexes_rebuilt, "interrupted_runs_closed": interrupted,
        "direct_load": manifest.published is not None, "rows_skipped_unchanged": manifest.rows_unchanged,
        "lock_reacquired": lock_reacquired, "future_cursor_rows": result.future_cursor_rows,
        # the BigQuery snapshot the published data reflects (refresh_freshness.data_as_of)
        # (a repair's is not: it mended a few rows or periods, the rest is as of the last night)
        ("repair_read_snapshot" if plan.repair else "data_as_of"): (plan.session or {}).get("snapshot_time"),
        **({"repair": True} if plan.repair else {}),
        **({"restarted": plan.restarted} if plan.restarted else {}),  # a checkpoint not resumed, and why
        "publish_group": plan.publish_group,
        # bytes BigQuery scans: the read session's estimate; a query or view source's job, processed and billed
        "bigquery_bytes": plan.bigquery_bytes,
        "analyzed": False,
    }
    with res.target.connect(autocommit=True) as conn:
        if not dry_run:  # after the publish's COMMIT: the dashboards' plans see the new contents at once
            analysis = analyze_after_publish(conn, plan.target_schema, plan.target_table,
                                             result.rows_inserted + result.rows_updated + result.rows_deleted,
                                             settings.analyze_changed_fraction)
            metadata["analyzed"] = analysis.analyzed
            if analysis.error:
                metadata["analyze_error"] = analysis.error
        finish_audit(
            conn, settings.schema_name, audit_id, status=status, rows_processed=manifest.rows_read,
            rows_inserted=result.rows_inserted, rows_updated=result.rows_updated, rows_deleted=result.rows_deleted,
            bigquery_job_id=plan.bigquery_job_id or manifest.read_session, metadata=metadata,
        )
        passed, ran = checks_passed(conn, settings.schema_name, [audit_id]).get(audit_id, (0, 0))
    return {
        "table": table, "status": status, "audit_id": audit_id, "rows_read": manifest.rows_read,
        "rows_inserted": result.rows_inserted, "rows_updated": result.rows_updated,
        "rows_deleted": result.rows_deleted, "execution_time_ms": elapsed_ms, "checks_run": ran,
        "checks_passed": passed, **metadata,
    }


def announce_run(res: Resources, summary: dict[str, Any], plan: sync.RefreshPlan, manifest: sync.StageManifest,
                 result: sync.PublishResult, *, previous: str | None, run_id: str | None, dry_run: bool,
                 refresh_views: bool) -> dict[str, Any]:
    """After a published run: its alerts (recovered, drift, rejected rows, future cursors, slow), the empty-read
    check, the dependent views (when this run refreshes them) and the run's artifact."""
    logger = get_run_logger()
    settings = res.settings
    table, status, audit_id = summary["table"], summary["status"], summary["audit_id"]
    counts = {k: summary[k] for k in ("rows_read", "rows_inserted", "rows_updated", "rows_deleted")}
    url = _flow_run_url(run_id)
    with res.target.connect(autocommit=True) as conn:
        if previous == "failed" and not dry_run:
            send_alert(settings, Alert("recovered", status, table, None, run_id, url, counts,
                                       audit_log_id=audit_id), conn)
        if plan.drift:
            send_alert(settings, Alert("schema_drift", status, table, None, run_id, url, counts,
                                       {"drift": plan.drift}, audit_log_id=audit_id), conn)
        if manifest.rows_quarantined or result.duplicate_keys:
            send_alert(settings, Alert("rows_rejected", status, table, _rejected_message(plan, manifest, result),
                                       run_id, url, counts, {"rows_quarantined": manifest.rows_quarantined,
                                                             "duplicate_keys": result.duplicate_keys,
                                                             "key": plan.key}, audit_log_id=audit_id), conn)
        if result.future_cursor_rows:
            send_alert(settings, Alert(
                "future_cursor", status, table,
                f"{table}: {result.future_cursor_rows} row(s) with {plan.cursor} more than 5 minutes past the read"
                f" snapshot {plan.session.get('snapshot_time')}; loaded, the watermark held at the snapshot",
                run_id, url, counts, {"future_cursor_rows": result.future_cursor_rows, "cursor": plan.cursor},
                audit_log_id=audit_id), conn)
        if summary["slow"]:
            logger.warning("%s took %d ms, over REFRESH_TIMEOUT_WARNING_MS=%d", table, summary["execution_time_ms"],
                           settings.timeout_warning_ms)
            send_alert(settings, Alert("timeout_warning", status, table, None, run_id, url, counts,
                                       {"execution_time_ms": summary["execution_time_ms"]}, audit_log_id=audit_id),
                       conn)
    if not dry_run:
        _note_empty_read(res, table, manifest.rows_read, run_id, audit_id)
    changed = result.rows_inserted + result.rows_updated + result.rows_deleted > 0
    if refresh_views and not dry_run and not plan.shadow:
        summary["views"] = views_task([plan.target_label] if changed else [], [plan.target_label])
        report_view_failures(summary["views"], {plan.target_label: summary}, run_id)
    summary["changed"] = changed and not dry_run
    publish_table_artifact([summary], key=None, title=f"refresh of {table}")
    logger.info("%s %s: read %d, inserted %d, updated %d, deleted %d", table, summary["status"], manifest.rows_read,
                result.rows_inserted, result.rows_updated, result.rows_deleted)
    return summary
