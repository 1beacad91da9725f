"""What Prefect records of a night, read back through its API: runs named after their tables, a failed night's
state naming the failed tables with its summary still readable, and the run artifact's checks column."""

from __future__ import annotations

import json
import pickle
from typing import Any

import psycopg
import pytest

from blocks import BigQuerySource
from bq_refresh.errors import NightFailed
from bq_refresh.settings import Settings
from flows.daily_refresh import daily_refresh, night_summary, pick_table_deployment
from tasks.artifacts import _checks
from tasks.registry import register_table
from tests.bqdata import put_table
from tests.test_engine import SQP_KEY, SQP_SCHEMA, sqp_rows

TABLES = ["asin_performance_data", "search_query_performance", "broken"]


@pytest.mark.parametrize("explicit, pool, on_pool, expected", [
    ("refresh-table/other", "bq-refresh-process", ["refresh-table-process"], "refresh-table/other"),
    (None, "bq-refresh-process", ["refresh-table-process"], "refresh-table/refresh-table-process"),
    (None, "bq-refresh-docker", ["refresh-table"], "refresh-table/refresh-table"),
    (None, "some-pool", ["b", "a"], "refresh-table/a"),
    (None, "some-pool", [], "refresh-table/refresh-table"),  # no refresh-table deployment on the pool
    (None, None, [], "refresh-table/refresh-table"),  # not run from a deployment
])
def test_scale_out_goes_to_the_refresh_table_deployment_of_the_parents_pool(
    explicit: str | None, pool: str | None, on_pool: list[str], expected: str
) -> None:
    assert pick_table_deployment(explicit, pool, on_pool) == expected


@pytest.mark.parametrize("run, cell", [
    ({"checks_run": 6, "checks_passed": 6, "checks_warned": []}, "6/6 passed"),
    ({"checks_run": 6, "checks_passed": 5, "checks_warned": ["null_fraction"]}, "5/6 passed; warned: null_fraction"),
    ({"status": "failed", "error": "boom"}, None),
])
def test_the_artifacts_checks_cell(run: dict[str, Any], cell: str | None) -> None:
    assert _checks(run) == cell


def test_a_failed_nights_exception_keeps_its_summary_through_pickle() -> None:
    """Prefect persists a state's data with pickle: the summary must come back with the exception."""
    error = pickle.loads(pickle.dumps(NightFailed("1 table(s) failed: sqp.t", summary={"failed": ["sqp.t"]})))
    assert str(error) == "1 table(s) failed: sqp.t" and error.summary == {"failed": ["sqp.t"]}


@pytest.mark.emulator
@pytest.mark.once  # Prefect's records, not the database's
@pytest.mark.usefixtures("prefect_harness")
def test_runs_are_named_after_their_tables_and_a_failed_night_says_which(
    env: Settings, registry: str, pg: psycopg.Connection[Any]
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
    )

    put_table(BigQuerySource.from_settings(env), "sqp", SQP_SCHEMA, sqp_rows(30))
    spec = {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"}
    for name in TABLES:
        register_table(pg, registry, name, {**spec, "source": "missing_source"} if name == "broken" else spec)
    tables = [f"{registry}.{t}" for t in TABLES]

    state = daily_refresh(return_state=True)
    assert state.is_failed() and state.message == f"1 table(s) failed: {registry}.broken"
    summary = night_summary(state)
    assert summary["failed"] == [f"{registry}.broken"] and {r["table"] for r in summary["tables"]} == set(tables)
    parent = state.state_details.flow_run_id
    assert parent is not None

    with get_client(sync_client=True) as client:
        subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])))
        assert sorted(r.name for r in subflows) == sorted(tables)  # refresh-table runs: "schema.table"
        task_names = {t.name for t in client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[parent, *(r.id for r in subflows)])))}
        for table in tables:
            assert f"refresh-{table}" in task_names and f"plan-{table}" in task_names, sorted(task_names)
            if not table.endswith(".broken"):  # the broken table stops at its plan
                assert f"stage-{table}" in task_names, sorted(task_names)
        # Every task of a table names it (a first load checks and publishes as it stages: no check/publish task).
        # Not counted: Prefect's own stand-in task of each subflow ("refresh-table-<uuid>"; its node in the run
        # graph is labelled "refresh-table / <the subflow run's name>").
        per_table = {n for n in task_names if not n.startswith(("plan-waves", "views", "refresh-table-"))}
        assert all(n.split("-", 1)[0] in {"refresh", "plan", "stage", "check", "publish"} and n.split("-", 1)[1]
                   in tables for n in per_table), sorted(per_table - {f"{k}-{t}" for k in ("refresh", "plan", "stage", "check", "publish") for t in tables})
        by_name = {r.name: r for r in subflows}
        assert by_name[f"{registry}.broken"].state_type is not None
        assert by_name[f"{registry}.broken"].state_type.value == "FAILED"
        flow_run = client.read_flow_run(parent)
        assert flow_run.state is not None and flow_run.state.message == f"1 table(s) failed: {registry}.broken"

        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[parent])))
    night = next(a for a in artifacts if a.key == "daily-refresh-summary")
    data = json.loads(night.data) if isinstance(night.data, str) else night.data
    rows = {r["table"]: r for r in data}
    for table in tables[:2]:
        passed, ran = rows[table]["checks"].split(" ")[0].split("/")
        assert int(ran) > 0 and passed == ran, rows[table]
    assert rows[f"{registry}.broken"]["status"] == "failed" and rows[f"{registry}.broken"]["checks"] is None
