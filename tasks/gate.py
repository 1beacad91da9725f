"""The quality gate: the staged rows' checks, and after the publish (in its transaction) the reconciliation
against the source's counts."""

from __future__ import annotations

import logging
from typing import Any

from psycopg import sql

from blocks.resources import Resources
from tasks import checkpoints, digest, load, quality, reconcile
from tasks import restriction as rs
from tasks.artifacts import record_phase
from tasks.refresh_plan import RefreshPlan, discard_staging, pg_type
from tasks.sqlnames import ident

log = logging.getLogger(__name__)


def check_staged(res: Resources, plan: RefreshPlan, *, audit_id: int | None) -> list[quality.CheckResult]:
    """Run the quality gate on the staged rows; record every result; a hard failure discards the
    staging and raises QualityCheckFailed (nothing is published)."""
    record_phase(plan.table, "checking")
    with res.target.connect(autocommit=True) as conn:
        ckpt = checkpoints.read(conn, plan.registry_schema, plan.checkpoint_id)
        state = ckpt.data if ckpt else {}
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
    record_and_gate(res, plan, audit_id, results, lambda: None, "failed quality check")
    return results


def record_and_gate(res: Resources, plan: RefreshPlan, audit_id: int | None, results: list[quality.CheckResult],
                     rollback: Any, reason: str) -> None:
    """Record every check result (committed apart, so a failed run keeps them); on a hard failure roll the
    run's transaction back, discard its staging and raise QualityCheckFailed."""
    with res.target.connect(autocommit=True) as audit_conn:
        quality.record(audit_conn, plan.registry_schema, audit_id, results)
    if any(r.hard and not r.ok for r in results):
        rollback()
        discard_staging(res, plan, reason)
        quality.raise_on_hard_failures(plan.table, results)


def reconciliation(conn: Any, plan: RefreshPlan, target: sql.Composable, soft: str | None) -> list[quality.CheckResult]:
    """The target's rows per replaced period, or in all, against the source's at the read snapshot (hard).
    Nothing when the run's mode promises no count (incremental without deletes): no check row that proves nothing."""
    expected = dict(plan.expected_periods) if plan.expected_periods is not None else None
    scope = repair_scope(plan) if plan.repair_keys is not None else None
    slices = (len(expected) if expected is not None else 0) + (1 if plan.expected_rows is not None else 0)
    if not slices:
        return []
    problems = reconcile.prove(conn, table=plan.table, target=target, window=plan.window_column,
                               pg_type=pg_type(plan, plan.window_column) if plan.window_column else None,
                               expected_periods=expected, expected_rows=plan.expected_rows, live_only=soft,
                               scope=scope)
    return [quality.CheckResult(
        "reconciliation", float(len(problems)), 0.0, ok=not problems, hard="reconciliation" in plan.checks.hard,
        detail="; ".join(problems[:20]) + (f" (and {len(problems) - 20} more)" if len(problems) > 20 else "")
        if problems else f"{slices} slice(s) equal to the source's count")]


def repair_scope(plan: RefreshPlan) -> sql.Composable:
    """The target rows of a repair's keys (alias t)."""
    assert plan.repair_keys is not None
    key_columns = [digest.DigestColumn(c.source_name, c.target_name, c.bq_type) for k in plan.key
                   for c in plan.columns if c.target_name == k]
    scope = digest.pg_key_scope(key_columns, plan.repair_keys, "t", {k: pg_type(plan, k) for k in plan.key})
    assert scope is not None  # the plan named them in BigQuery
    return scope
