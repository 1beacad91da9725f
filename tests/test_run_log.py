"""What bq-refresh's modules log with the standard library inside a run reaches the run's log on the Prefect server
(what the UI shows): here the warning that rows with a NULL key were quarantined, read back through the API."""

from __future__ import annotations

import time
from datetime import date, timedelta
from typing import Any

import psycopg
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

from blocks import BigQuerySource
from bq_refresh.settings import Settings
from flows.refresh_table import refresh_table
from tasks.registry import register_table
from tests.bqdata import put_table
from tests.test_bad_input import LOOSE_SCHEMA, T0, loose_rows
from tests.test_engine import SQP_KEY

pytestmark = [pytest.mark.emulator, pytest.mark.once, pytest.mark.usefixtures("prefect_harness")]


def run_log(flow_run_id: Any) -> list[tuple[int, str]]:  # noqa: D103
    """The run's log lines on the server, waited for (the handler sends them in the background)."""
    deadline = time.monotonic() + 30
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        lines = [(log.level, log.message) for log in logs]
        if any("quarantined" in m for _, m in lines) or time.monotonic() > deadline:
            return lines


def test_a_warning_of_the_engine_reaches_the_runs_log_on_the_server(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource,
) -> None:
    put_table(source, "loose", LOOSE_SCHEMA, loose_rows(
        [(date(2025, 1, 5), "B01", "q1", 1, T0), (date(2025, 1, 5), None, "q2", 2, T0)]))
    register_table(pg, registry, "loose", {"source": "loose", "key": SQP_KEY, "cursor": "updated_at"})
    state = refresh_table("loose", return_state=True)
    assert state.result()["status"] == "warning"
    lines = run_log(state.state_details.flow_run_id)
    said = f"{registry}.loose: 1 row(s) with NULL in key column(s) start_date, asin, search_query quarantined"
    assert (30, said) in lines, lines  # the first load (the direct path)

    # The next night stages its rows, read in a thread a stream: the line is still the run's.
    put_table(source, "loose", LOOSE_SCHEMA, loose_rows(
        [(date(2025, 1, 5), "B01", "q1", 1, T0), (date(2025, 1, 5), None, "q2", 2, T0),
         (date(2025, 1, 5), "B02", None, 3, T0 + timedelta(days=1))]))
    state = refresh_table("loose", return_state=True)
    assert state.result()["status"] == "warning"
    lines = run_log(state.state_details.flow_run_id)
    assert [m for level, m in lines if level >= 30] == [said.replace(": 1 row(s)", ": 2 row(s)")], lines  # q2 re-read
