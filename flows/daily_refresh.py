"""The parent flow: read the registry, plan waves, run one refresh-table subflow per table."""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

from prefect import Flow, flow, get_run_logger, task
from prefect.cache_policies import INPUTS, NO_CACHE
from prefect.client.schemas.objects import FlowRun, State
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner

from blocks.resources import resolve_resources
from bq_refresh.errors import DependencyCycle, NightFailed, RefreshError
from bq_refresh.redact import redact
from bq_refresh.settings import load_settings
from flows import runlog
from flows.automations import mark_alerted
from flows.publish_group import settle_group
from flows.refresh_table import refresh_table, report_view_failures, views_task
from tasks.alerts import Alert, failure_alerts, send_alert
from tasks.artifacts import publish_markdown, publish_table_artifact
from tasks.audit import finish_audit, start_audit
from tasks.freshness import check_freshness
from tasks.planning import admits, plan_waves, split_cycles, streams_within, table_sessions
from tasks.preflight import require_session_state
from tasks.registry import RegistryEntry, complete_groups, due_entries, list_dependencies, list_entries

runlog.attach()

REFRESH_TABLE_DEPLOYMENT = "refresh-table/refresh-table"  # scale-out's last resort: the docker pool's


class _NightOutcomeFilter(logging.Filter):
    """A worker's engine re-raises a failed run's own outcome for the process and logs it as "Engine execution
    exited with unexpected exception" with a traceback. For a night that ended Failed with NightFailed the state
    already says which tables failed (and each table's run says why): that line says nothing new, and is dropped.
    Any other exception is still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, NightFailed) and record.getMessage().startswith("Engine execution exited"))


_run_logger = logging.getLogger("prefect.flow_runs")  # the logger of the worker engine's error line
if not any(isinstance(f, _NightOutcomeFilter) for f in _run_logger.filters):
    _run_logger.addFilter(_NightOutcomeFilter())


def pick_table_deployment(explicit: str | None, pool: str | None, on_pool: list[str]) -> str:
    """The "flow/deployment" scale-out runs go to: the one named, else the refresh-table deployment on the work
    pool this night runs on (the first by name), else REFRESH_TABLE_DEPLOYMENT.

    Args:
        explicit: the ``table_deployment`` parameter.
        pool: the work pool of this night's run (None: not run from a deployment).
        on_pool: names of the refresh-table deployments on that pool.
    """
    if explicit:
        return explicit
    if pool and on_pool:
        return f"refresh-table/{sorted(on_pool)[0]}"
    return REFRESH_TABLE_DEPLOYMENT


def _table_deployment(explicit: str | None) -> str:
    if explicit:
        return explicit
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, WorkPoolFilter, WorkPoolFilterName
    context = FlowRunContext.get()
    pool = context.flow_run.work_pool_name if context and context.flow_run else None
    on_pool: list[str] = []
    if pool:
        with get_client(sync_client=True) as client:
            on_pool = [d.name for d in client.read_deployments(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["refresh-table"])),
                work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])))]
    return pick_table_deployment(explicit, pool, on_pool)


def night_summary(state: State[Any]) -> dict[str, Any]:
    """The summary of a night's run from its final state, Completed or Failed with failed tables.

    Raises:
        The run's error when it failed before it had tables to report (e.g. a refused connection).
    """
    data = state.result(raise_on_failure=False)
    if isinstance(data, NightFailed):
        return data.summary
    if isinstance(data, dict):
        return data
    if isinstance(data, BaseException):
        raise data
    raise RefreshError(state.message or "the night's run ended without a summary")


def _on_night_failure(flow: Flow[Any, Any], flow_run: FlowRun, state: State[Any]) -> None:
    """A night that failed or crashed outside its tables (a refused connection, an unreadable registry, a killed
    process whose hooks still ran) sends run_failed; failed tables were reported by their own runs. Never raises."""
    try:
        try:
            state.result()
            error: BaseException | None = None
        except BaseException as exc:  # noqa: BLE001 - the run's own failure
            error = exc
        if isinstance(error, NightFailed):  # its tables were reported; the automation waits for this event after
            if error.reported:  # the Failed state, so it is sent from here
                mark_alerted(flow_run.id, flow_run.flow_id, flow.name)
            return
        settings = load_settings()
        message = redact(str(error) if error is not None and str(error) else (state.message or state.type.value))
        alert = Alert("run_failed", state.type.value.lower(), None, message[:2000], str(flow_run.id), None)
        try:
            with resolve_resources(settings).target.connect(autocommit=True) as conn:
                deliveries = send_alert(settings, alert, conn)
        except Exception:  # noqa: BLE001 - the database may be why the night failed: alert without a record
            deliveries = send_alert(settings, alert)
        if any(d.delivered for d in deliveries):
            mark_alerted(flow_run.id, flow_run.flow_id, flow.name)
    except Exception as exc:  # noqa: BLE001 - a failing hook logs and never hides the run's outcome
        logging.getLogger(__name__).warning("daily-refresh failure hook failed: %s", exc)


@task(name="plan-waves", cache_policy=INPUTS, cache_expiration=timedelta(hours=1))
def plan_waves_task(tables: dict[str, int], dependencies: list[tuple[str, str, str]]) -> list[list[str]]:
    """Pure function of small descriptors: cached on them."""
    return plan_waves(tables, dependencies)


@task(name="refresh", cache_policy=NO_CACHE, task_run_name="refresh-{table}")
def run_table(table: str, full_refresh: bool, dry_run: bool, deployment: str | None, timeout_s: float,
              allow_deletes: bool = False, hold_publish: bool = False) -> dict[str, Any]:
    """Run one table's subflow here, or as a flow run of the refresh-table deployment (scale-out); a publish
    group's member stops before its publish (``hold_publish``)."""
    if deployment:
        from prefect.deployments import run_deployment

        run = run_deployment(deployment, timeout=timeout_s, as_subflow=True, flow_run_name=table,
                             parameters={"table": table, "full_refresh": full_refresh, "dry_run": dry_run,
                                         "allow_deletes": allow_deletes, "hold_publish": hold_publish,
                                         "refresh_views": False})
        state = run.state  # type: ignore[union-attr]
        if state is None or not state.is_completed():
            raise RuntimeError(f"{table}: deployment run {run.id} ended {state.type.value if state else 'unknown'}")  # type: ignore[union-attr]
        return dict(state.result())
    return refresh_table.with_options(timeout_seconds=timeout_s)(table, full_refresh=full_refresh, dry_run=dry_run,
                                                                 allow_deletes=allow_deletes,
                                                                 hold_publish=hold_publish, refresh_views=False)


def _time_limit(entry: RegistryEntry, table_timeout_s: float) -> float:
    """A table's time limit: REFRESH_TABLE_TIMEOUT_SECONDS for the refresh itself, plus the longest wait for
    its source to be ready (else a table waiting for a late load would time out instead of being reported
    not ready)."""
    try:
        readiness = entry.spec().readiness
    except RefreshError:  # invalid parameters: the table's own run fails and says so
        return table_timeout_s
    return table_timeout_s + (readiness.wait_minutes * 60 if readiness is not None else 0)


def _streams(entry: RegistryEntry) -> int:
    try:
        return entry.spec().streams
    except RefreshError:  # invalid parameters: the table's own run fails and says so
        return 1


@flow(name="daily-refresh", task_runner=ThreadPoolTaskRunner(max_workers=16),  # type: ignore[arg-type]
      on_failure=[_on_night_failure], on_crashed=[_on_night_failure])
def daily_refresh(
    tables: list[str] | None = None,
    full_refresh: bool = False,
    dry_run: bool = False,
    force: bool = False,
    max_concurrency: int = 4,
    allow_deletes: bool = False,
    use_deployments: bool = False,
    table_deployment: str | None = None,
) -> Any:
    """Refresh every due table (or the named ones) in dependency order, several at once.

    Args:
        tables: tables to refresh; none = every enabled table that is due.
        full_refresh: re-read everything and replace.
        dry_run: everything except publishing.
        force: refresh enabled tables even if not due yet.
        allow_deletes: window mode: delete more vanished periods than a table's max_vanished_periods.
        max_concurrency: tables refreshed at the same time.
        use_deployments: start each table as a flow run of the refresh-table deployment (work-pool scale-out).
        table_deployment: the "flow/deployment" runs go to when use_deployments is on; default: the
            refresh-table deployment on the work pool this run came from (refresh-table-process on the process
            pool), else refresh-table/refresh-table.

    Returns:
        A summary per table. When a table failed, the run ends Failed naming the failed tables, with the
        summary in a NightFailed as its data (``night_summary(state)`` reads it either way).
    """
    logger = get_run_logger()
    settings = load_settings()
    res = resolve_resources(settings)
    schema = settings.schema_name
    run_id = str(current_flow_run.id) if current_flow_run.id else None
    # Before anything is touched: a transaction pooler is refused (run_failed from the failure hook).
    require_session_state(res.target)
    deployment = _table_deployment(table_deployment) if use_deployments else None
    with res.target.connect(autocommit=True) as conn:
        started_at = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]  # the alerts' clock
        entries = due_entries(conn, schema, names=tables, force=force,
                              tolerance=timedelta(minutes=settings.due_tolerance_minutes))
        deps = [(d.parent, d.dependent, d.kind) for d in list_dependencies(conn, schema)]
        entries, pulled = complete_groups(entries, list_entries(conn, schema))
    if pulled:
        logger.info("added to complete their publish groups: %s", pulled)
    by_name = {e.name: e for e in entries}
    groups = {e.name: str(e.publish_group) for e in entries if e.publish_group is not None}
    settled: set[str] = set()
    needs = {e.name: table_sessions(streams_within(_streams(e), settings.max_connections)) for e in entries}
    # Tables caught in a dependency cycle fail (audit row, alert) and the others still run.
    acyclic, cyclic = split_cycles({e.name: e.priority for e in entries}, deps)
    results: dict[str, dict[str, Any]] = {}
    own_run_failed: set[str] = set()  # tables whose own run ended failed: its hooks (or the automation) report it
    for name, message in cyclic.items():
        e = by_name[name]
        error = DependencyCycle(message, table=name)
        with res.target.connect(autocommit=True) as conn:
            audit_id = start_audit(conn, schema, config_id=e.id, table_schema=e.table_schema,
                                   table_name=e.table_name, metadata={"flow_run_id": run_id})
            finish_audit(conn, schema, audit_id, status="failed", error=error)
            send_alert(settings, Alert("table_failed", "failed", name, str(error), run_id, None,
                                       audit_log_id=audit_id), conn)
        results[name] = {"table": name, "status": "failed", "error": str(error)}
        logger.error("%s", error)
    waves = plan_waves_task(acyclic, [d for d in deps if d[0] in acyclic and d[1] in acyclic])
    hard_parents: dict[str, set[str]] = {}
    for parent, dependent, kind in deps:
        if kind == "hard":
            hard_parents.setdefault(dependent, set()).add(parent)
    logger.info("%d table(s) due, in %d wave(s): %s", len(entries), len(waves), waves)

    for wave in waves:
        runnable = []
        for name in wave:
            broken = sorted(p for p in hard_parents.get(name, ()) if results.get(p, {}).get("status") in {"failed", "skipped"})
            if broken:
                reason = f"skipped: hard dependency {', '.join(broken)} did not refresh"
                with res.target.connect(autocommit=True) as conn:
                    e = by_name[name]
                    audit_id = start_audit(conn, schema, config_id=e.id, table_schema=e.table_schema,
                                           table_name=e.table_name, metadata={"flow_run_id": run_id})
                    finish_audit(conn, schema, audit_id, status="skipped", metadata={"reason": reason})
                results[name] = {"table": name, "status": "skipped", "reason": reason}
                logger.warning("%s %s", name, reason)
            else:
                runnable.append(name)
        active: list[tuple[str, PrefectFuture[dict[str, Any]]]] = []
        queue = list(runnable)
        while queue or active:
            # Concurrency, and the sessions the running tables may hold against REFRESH_MAX_CONNECTIONS.
            while (queue and len(active) < max(1, max_concurrency)
                   and admits([needs[n] for n, _ in active], needs[queue[0]], settings.max_connections)):
                name = queue.pop(0)
                active.append((name, run_table.submit(name, full_refresh, dry_run, deployment,
                                                      _time_limit(by_name[name], settings.table_timeout_s),
                                                      allow_deletes, name in groups)))
            still = []
            for name, fut in active:
                if fut.state.is_final():
                    try:
                        results[name] = fut.result()
                    except BaseException as exc:  # noqa: BLE001 - one table's failure never stops the others
                        results[name] = {"table": name, "status": "failed", "error": redact(str(exc))[:2000]}
                        own_run_failed.add(name)
                else:
                    still.append((name, fut))
            active = still
            if active:
                time.sleep(0.2)
        # A group whose members all have an outcome publishes now, before the tables of later waves run.
        for group in sorted(set(groups.values()) - settled):
            members = [n for w in waves for n in w if groups.get(n) == group] + [n for n in cyclic if groups.get(n) == group]
            if all(n in results for n in members):
                settled.add(group)
                try:
                    results.update(settle_group(group, [results[n] for n in members], dry_run, run_id))
                except Exception as exc:  # noqa: BLE001 - e.g. PostgreSQL gone mid-publish: the group is not published
                    why = f"publish group {group!r} not published: {redact(str(exc))[:2000]}"
                    for n in members:
                        if results[n].get("status") == "staged":  # its audit row is closed by the next run
                            results[n] = {"table": n, "status": "failed", "error": why, "publish_group": group}
                    logger.error("%s", why)

    ordered = [results[n] for n in cyclic] + [results[n] for wave in waves for n in wave]
    refreshed = [r for r in ordered if r["status"] in {"success", "warning"} and not r.get("shadow")]
    views: list[dict[str, Any]] = []
    if refreshed and not dry_run:
        views = views_task([r["target"] for r in refreshed if r.get("changed")], [r["target"] for r in refreshed])
        report_view_failures(views, {r["target"]: r for r in refreshed}, run_id)
    failed = [r["table"] for r in ordered if r["status"] == "failed"]
    publish_table_artifact(ordered, key="daily-refresh-summary", title="daily refresh: one row per table")
    lines = [f"# daily refresh: {len(ordered) - len(failed)} of {len(ordered)} table(s) without failure", ""]
    lines += [f"- **{r['table']}**: {r['status']}" + (f" ({r.get('error') or r.get('reason')})"
                                                      if r["status"] in {"failed", "skipped"} else
                                                      f", read {r.get('rows_read', 0)}, inserted {r.get('rows_inserted', 0)},"
                                                      f" updated {r.get('rows_updated', 0)}, deleted {r.get('rows_deleted', 0)}")
              + (f"; dependent view(s) failed: {', '.join(v['view'] for v in r['views_failed'])}"
                 if r.get("views_failed") else "")
              for r in ordered]
    broken_views = [v for v in views if v.get("error") or not v.get("queryable", True)]
    if broken_views:
        lines += ["", f"## {len(broken_views)} dependent view(s) failed", ""]
        lines += [f"- **{v['view']}** ({v['kind']}): {v['error'] or 'not queryable'}" for v in broken_views]
    publish_markdown("\n".join(lines), key="daily-refresh-report", title="daily refresh report")
    summary: dict[str, Any] = {"tables": ordered, "failed": failed, "waves": waves, "views": views}
    with res.target.connect(autocommit=True) as conn:
        # Every enabled table, due tonight or not: a table left behind is said once per episode.
        freshness = check_freshness(conn, settings, flow_run_id=run_id)
        summary["stale"] = freshness.stale
        if freshness.stale:
            logger.warning("stale tables (older than frequency + %g h): %s", settings.health_grace_hours,
                           freshness.stale)
        counts = {"tables": len(ordered), "failed": len(failed),
                  "skipped": sum(1 for r in ordered if r["status"] == "skipped")}
        reported = _report_failures(settings, conn, [r for r in ordered if r["status"] == "failed"],
                                    own_run_failed, started_at, run_id)
        if settings.daily_summary_alert:
            send_alert(settings, Alert("daily_summary", "failed" if failed else "success", None, None, run_id, None,
                                       counts, {"failed": failed}), conn)
    if failed:
        message = f"{len(failed)} table(s) failed: {', '.join(failed)}"
        return Failed(message=message, data=NightFailed(message, summary=summary, reported=reported))
    return Completed(message=f"{len(ordered)} table(s) refreshed", data=summary)


def _report_failures(settings: Any, conn: Any, failures: list[dict[str, Any]], own_run_failed: set[str],
                     since: Any, run_id: str | None) -> bool:
    """One report per failed table: a table whose own run failed was reported by that run's hook (or, when the
    hook could not run, by the failure automation); any other failed table (a dependency cycle, a publish group
    that could not publish, a view that failed) that no alert has named since the night began gets its
    table_failed here. True when each of those was delivered somewhere (else the automation reports the night)."""
    others = [r for r in failures if r["table"] not in own_run_failed]
    if not others:
        return True
    seen = failure_alerts(conn, settings.schema_name, [r["table"] for r in others], since)
    delivered = True
    for r in others:
        if r["table"] in seen:
            delivered = delivered and seen[r["table"]]
            continue
        deliveries = send_alert(settings, Alert("table_failed", "failed", r["table"], r.get("error"), run_id, None,
                                                details={k: r[k] for k in ("publish_group",) if r.get(k)},
                                                audit_log_id=r.get("audit_id")), conn)
        delivered = delivered and any(d.delivered for d in deliveries)
    return delivered
