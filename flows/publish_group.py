"""Publish groups: tables that dashboards join, staged and checked each on its own, published together.

The members' subflows run with ``hold_publish`` and return ``status: staged``; once every member of a group has
an outcome, ``settle_group`` publishes the staged ones in one PostgreSQL transaction (``sync.publish_group``), or,
when a member failed or was skipped, holds the whole group at its previous data: the others' staging is
discarded (the next run reads every member afresh at one snapshot) and their audit rows say ``skipped: held``.
One alert per held group: the failing member's own (its subflow's hook names the group), or one from here.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blocks.resources import Resources, resolve_resources
from bq_refresh.errors import AlreadyRunning, GroupHeld, QualityCheckFailed, RefreshError
from bq_refresh.redact import redact
from bq_refresh.settings import load_settings
from flows.refresh_table import _flow_run_url, announce_run, finish_run
from tasks import sync
from tasks.alerts import Alert, send_alert
from tasks.audit import finish_audit
from tasks.locks import table_lock


def _hold(res: Resources, group: str, staged: list[dict[str, Any]], reason: str,
          dry_run: bool) -> dict[str, dict[str, Any]]:
    """Hold staged members at their previous data: staging discarded, audit row skipped with the reason."""
    held: dict[str, dict[str, Any]] = {}
    for member in staged:
        plan = sync.RefreshPlan.model_validate(member["plan"])
        sync.discard_staging(res, plan, f"publish group {group!r} held")
        with res.target.connect(autocommit=True) as conn:
            finish_audit(conn, res.settings.schema_name, int(member["audit_id"]), status="skipped",
                         metadata={"reason": reason, "publish_group": group, "dry_run": dry_run})
        held[member["table"]] = {"table": member["table"], "status": "skipped", "reason": reason,
                                 "publish_group": group, "audit_id": member["audit_id"]}
    return held


@task(name="publish-group", cache_policy=NO_CACHE, task_run_name="publish-group-{group}")
def settle_group(group: str, members: list[dict[str, Any]], dry_run: bool,
                 run_id: str | None) -> dict[str, dict[str, Any]]:
    """Publish a group's staged members together, or hold them all.

    Args:
        group: the publish group.
        members: every member's outcome this run, in publish order: ``status: staged`` summaries of
            ``refresh_table(hold_publish=True)``, or failed/skipped ones.
        dry_run: roll the group's transaction back.
        run_id: the parent flow run (for a group-level alert).

    Returns:
        The members' final summaries (success/warning, failed, or skipped: held), by table.
    """
    logger = get_run_logger()
    settings = load_settings()
    res = resolve_resources(settings)
    staged = [m for m in members if m.get("status") == "staged"]
    blockers = [m for m in members if m.get("status") != "staged"]
    outcomes: dict[str, dict[str, Any]] = {m["table"]: m for m in blockers}
    if not staged:
        return outcomes
    if blockers:
        names = ", ".join(f"{m['table']} ({m.get('status')})" for m in blockers)
        reason = f"held: publish group {group!r}: {names} did not refresh; the group keeps its previous data"
        outcomes.update(_hold(res, group, staged, reason, dry_run))
        logger.warning("%s", reason)
        if not any(m.get("status") == "failed" for m in blockers):  # a failure alerted already, naming the group
            first = blockers[0]
            with res.target.connect(autocommit=True) as conn:
                send_alert(settings, Alert(
                    "group_held", "skipped", first["table"],
                    f"{first['table']}: {first.get('reason') or first.get('status')}; publish group {group!r} held:"
                    f" {', '.join(m['table'] for m in staged)} keep their previous data",
                    run_id, _flow_run_url(run_id), {}, {"publish_group": group, "held": [m["table"] for m in staged]},
                    audit_log_id=first.get("audit_id")), conn)
        return outcomes

    plans = [sync.RefreshPlan.model_validate(m["plan"]) for m in staged]
    manifests = {m["table"]: sync.StageManifest.model_validate(m["manifest"]) for m in staged}
    finished: list[tuple[dict[str, Any], sync.RefreshPlan]] = []
    with ExitStack() as locks:
        try:
            # The members' subflows released their locks when they returned: take them again (sorted: two
            # groups never wait on each other) so that no other run of a member interleaves with the publish.
            for name in sorted(m["table"] for m in staged):
                locks.enter_context(table_lock(res.target, name, settings.lock_wait_s))
            results = sync.publish_group(res, group, plans, dry_run=dry_run,
                                         audit_ids={m["table"]: int(m["audit_id"]) for m in staged})
        except Exception as exc:  # noqa: BLE001 - any failure holds the group; it is recorded and alerted
            member = exc.table if isinstance(exc, RefreshError) and exc.table else staged[0]["table"]
            cause = exc.__cause__ if isinstance(exc, GroupHeld) and exc.__cause__ is not None else exc
            failing = next((m for m in staged if m["table"] == member), staged[0])
            others = [m for m in staged if m is not failing]
            reason = f"held: publish group {group!r}: {member} failed at the group's publish"
            outcomes.update(_hold(res, group, others, reason, dry_run))
            if not isinstance(exc, AlreadyRunning):
                sync.discard_staging(res, sync.RefreshPlan.model_validate(failing["plan"]), "its group publish failed")
            message = redact(str(exc))[:2000]
            status = "skipped" if isinstance(exc, AlreadyRunning) else "failed"
            with res.target.connect(autocommit=True) as conn:
                finish_audit(conn, settings.schema_name, int(failing["audit_id"]), status=status, error=cause,
                             metadata={"publish_group": group, "dry_run": dry_run})
                event = ("group_held" if isinstance(exc, AlreadyRunning) else
                         "quality_check_failed" if isinstance(cause, QualityCheckFailed) else "table_failed")
                send_alert(settings, Alert(
                    event, status, member, message, failing.get("flow_run_id") or run_id,
                    _flow_run_url(failing.get("flow_run_id") or run_id), {},
                    {"publish_group": group, "held": [m["table"] for m in others]},
                    audit_log_id=int(failing["audit_id"])), conn)
            outcomes[member] = {"table": member, "status": status, "error": message, "publish_group": group,
                                "audit_id": failing["audit_id"]}
            logger.error("publish group %r held: %s", group, message)
            return outcomes
        for m, plan in zip(staged, plans, strict=True):
            result = results[plan.table]
            soft = list(m.get("soft_failures") or []) + list(result.checks_failed_soft)
            summary = finish_run(res, m["table"], plan, manifests[m["table"]], result, soft,
                                 audit_id=int(m["audit_id"]), interrupted=int(m.get("interrupted") or 0),
                                 lock_reacquired=int(m.get("lock_reacquired") or 0),
                                 elapsed_ms=int((time.time() - float(m["started_at"])) * 1000), dry_run=dry_run)
            finished.append((summary, plan))
    if dry_run:
        for plan in plans:
            sync.discard_staging(res, plan, "dry run")
    for summary, plan in finished:
        table = summary["table"]
        member = next(m for m in staged if m["table"] == table)
        outcomes[table] = announce_run(res, summary, plan, manifests[table], results[table],
                                       previous=member.get("previous"), run_id=member.get("flow_run_id"),
                                       dry_run=dry_run, refresh_views=False)
    logger.info("publish group %r published together: %s", group, ", ".join(m["table"] for m in staged))
    return outcomes
