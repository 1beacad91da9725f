"""What a run costs in BigQuery, and the budget that refuses a costly one before it runs.

``maximum_bytes_billed`` (per table; BIGQUERY_MAXIMUM_BYTES_BILLED by default) is set on every query job of a
query or view source (JobConfigurationQuery.maximumBytesBilled: BigQuery fails a job that would bill more, without
charge), and refused beforehand from the query's dry run; the emulator neither enforces it nor estimates (0 bytes),
so a recording proxy (tests/bqrecorder.py) gives its answers BigQuery's figures. A table's read is refused when its
read session (free to open) estimates more (ReadSession.estimated_total_bytes_scanned, served by the stand-in):
before any query job and any ReadRows. A refusal is one line naming the table, the estimate and the limit; the run
is audited failed and alerted (table_failed), the live rows stay as they were. Every run's audit row records
``bigquery_bytes``; ``--dry-run`` reports the same figures."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from blocks import BigQuerySource
from bq_refresh.errors import OverBudget
from bq_refresh.services import EmulatorEndpoints
from bq_refresh.settings import Settings
from flows.refresh_table import refresh_table
from tasks.registry import register_table
from tests.bqdata import pg_rows, put_table, source_rows
from tests.bqrecorder import RecordingProxy, set_bytes
from tests.comparator import assert_same_rows
from tests.storage_standin import StorageStandIn
from tests.test_source_kinds import SCHEMA, rows

pytestmark = [pytest.mark.once, pytest.mark.second, pytest.mark.emulator, pytest.mark.usefixtures("prefect_harness")]


@pytest.fixture
def recorder(emulator: EmulatorEndpoints, monkeypatch: pytest.MonkeyPatch, env: Settings) -> Any:
    """The refresh's REST calls go through a recording proxy in front of the emulator."""
    proxy = RecordingProxy(emulator.rest_url)
    monkeypatch.setenv("BIGQUERY_API_ENDPOINT", proxy.url)
    yield proxy
    proxy.close()


def last_audit(pg: psycopg.Connection[Any], registry: str) -> tuple[Any, ...]:
    row = pg.execute(f'SELECT status, error_message, sync_metadata, error_details FROM "{registry}".refresh_audit_log'
                     " ORDER BY id DESC LIMIT 1").fetchone()
    assert row is not None
    return tuple(row)


def test_a_query_over_its_budget_is_refused_from_its_dry_run_before_any_job_runs(
        pg: psycopg.Connection[Any], registry: str, source: BigQuerySource, recorder: RecordingProxy,
        webhook: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFRESH_WEBHOOK_URL", webhook.url)
    put_table(source, "orders", SCHEMA, rows(120))
    query = f"SELECT id, day, amount FROM `{source.table_ref('orders')}` WHERE MOD(id, 2) = 0"
    register_table(pg, registry, "evens", {"query": query, "key": ["id"], "mode": "full",
                                          "maximum_bytes_billed": 1_000_000})
    recorder.rewrite = set_bytes(400_000, 10_485_760)  # under the budget
    assert refresh_table("evens")["status"] == "success"
    [dry, job] = [r for r in recorder.jobs() if query in r.query]  # (the counts and checks are jobs of their own)
    assert dry.dry_run and not job.dry_run
    assert job.body is not None and job.body["configuration"]["query"]["maximumBytesBilled"] == "1000000"
    before = pg_rows(pg, f'"{registry}".evens', "id")

    put_table(source, "orders", SCHEMA, rows(200))  # BigQuery's data grew: the query now scans more
    recorder.requests.clear()
    recorder.rewrite = set_bytes(5_000_000)
    with pytest.raises(OverBudget) as refused:
        refresh_table("evens")
    message = str(refused.value)
    assert message == (f"{registry}.evens: the query source's query would scan 5,000,000 bytes in BigQuery, over"
                       " maximum_bytes_billed 1,000,000; nothing read"), message
    assert [r.dry_run for r in recorder.jobs()] == [True]  # nothing ran but the (free) dry run
    status, error, _, details = last_audit(pg, registry)
    assert status == "failed" and error == message and details["context"]["estimate_bytes"] == 5_000_000, details
    assert "table_failed" in webhook.events()
    assert_same_rows(before, pg_rows(pg, f'"{registry}".evens', "id"), ["id"])  # live rows as they were


def test_a_query_bigquery_itself_refuses_for_its_budget_fails_the_same_way(
        pg: psycopg.Connection[Any], registry: str, source: BigQuerySource, recorder: RecordingProxy) -> None:
    """The dry run can underestimate; BigQuery then fails the job itself (bytesBilledLimitExceeded, not billed)."""
    put_table(source, "orders", SCHEMA, rows(10))
    query = f"SELECT id FROM `{source.table_ref('orders')}`"
    register_table(pg, registry, "ids", {"query": query, "key": ["id"], "mode": "full", "maximum_bytes_billed": 5000})
    recorder.rewrite = set_bytes(100)

    def limit_exceeded(seen: Any) -> tuple[int, dict[str, Any]] | None:
        if seen.job_insert and not seen.dry_run:  # BigQuery's answer to a job over maximumBytesBilled
            message = "Query exceeded limit for bytes billed: 5000. 10485760 or higher required."
            return 400, {"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT",
                                   "errors": [{"reason": "bytesBilledLimitExceeded", "message": message}]}}
        return None

    recorder.answer = limit_exceeded
    with pytest.raises(OverBudget, match=rf"^{registry}\.ids: the query source's query would bill more than"
                                         r" maximum_bytes_billed 5,000 \(BigQuery: bytesBilledLimitExceeded; its dry"
                                         r" run estimated 100 bytes\); nothing read$"):
        refresh_table("ids")
    assert last_audit(pg, registry)[0] == "failed"


def test_a_table_read_over_its_budget_is_refused_before_any_query_job_or_readrows(
        pg: psycopg.Connection[Any], registry: str, source: BigQuerySource, recorder: RecordingProxy,
        webhook: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the stand-in, whose read sessions estimate the bytes they scan: a full-mode table (its counts are a query
    job) is refused from the session's estimate before its count query and before any ReadRows."""
    with StorageStandIn() as standin:
        monkeypatch.setenv("BIGQUERY_STORAGE_ENDPOINT", standin.target)
        monkeypatch.setenv("REFRESH_WEBHOOK_URL", webhook.url)
        first = rows(150)
        put_table(source, "orders", SCHEMA, first)  # the REST side (schema, counts) on the emulator
        standin.register(source.table_ref("orders"), first, estimated_bytes=8_000)
        monkeypatch.setenv("BIGQUERY_MAXIMUM_BYTES_BILLED", "10000")  # the default budget, no table's own
        register_table(pg, registry, "orders", {"source": "orders", "key": ["id"], "mode": "full"})
        assert refresh_table("orders")["status"] == "success"
        assert [s.error for s in standin.sessions] == [None]  # one session: estimated, checked, then read
        assert_same_rows(source_rows(source, "orders"), pg_rows(pg, f'"{registry}".orders', "id"), ["id"])
        before = pg_rows(pg, f'"{registry}".orders', "id")

        second = rows(300)
        put_table(source, "orders", SCHEMA, second)
        standin.register(source.table_ref("orders"), second, estimated_bytes=52_000)
        standin.sessions.clear()
        standin.reads.clear()
        recorder.requests.clear()
        with pytest.raises(OverBudget) as refused:
            refresh_table("orders")
        ref = source.table_ref("orders")
        assert str(refused.value) == (f"{registry}.orders: the read of {ref} would scan 52,000 bytes in BigQuery, over"
                                      " maximum_bytes_billed 10,000; nothing read")
        assert len(standin.sessions) == 1 and standin.reads == []  # the session's estimate, no ReadRows
        assert recorder.jobs() == []  # no query job (the full mode's counts come after the check)
    status, error, _, _ = last_audit(pg, registry)
    assert status == "failed" and "over maximum_bytes_billed 10,000" in error
    assert "table_failed" in webhook.events()
    assert_same_rows(before, pg_rows(pg, f'"{registry}".orders', "id"), ["id"])


def test_a_query_result_over_its_budget_is_refused_before_it_is_read_saying_the_query_already_ran(
        pg: psycopg.Connection[Any], registry: str, source: BigQuerySource, recorder: RecordingProxy,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A query job's result table is read through the Storage Read API, which bills the bytes it reads apart from the
    query (cloud.google.com/bigquery/pricing, "Data extraction pricing"): a result whose read session estimates more
    than the budget is not read. Its size is known only once the query ran, so the refusal says the query already
    ran and what it billed, not "nothing read". On the emulator's DDL route the result is a named table, served by
    the stand-in with BigQuery's estimate."""
    from tasks.sources import result_table_name

    with StorageStandIn() as standin:
        monkeypatch.setenv("BIGQUERY_STORAGE_ENDPOINT", standin.target)
        put_table(source, "orders", SCHEMA, rows(60))
        query = f"SELECT id, day, amount FROM `{source.table_ref('orders')}`"
        register_table(pg, registry, "wide", {"query": query, "key": ["id"], "mode": "full",
                                             "maximum_bytes_billed": 20_000_000})
        result = source.table_ref(result_table_name(f"{registry}.wide"))
        standin.register(result, rows(60), estimated_bytes=52_000_000)
        recorder.rewrite = set_bytes(4_000_000, 10_485_760)  # the query: within the budget
        with pytest.raises(OverBudget) as refused:
            refresh_table("wide")
        [job] = [r for r in recorder.jobs() if query in r.query and not r.dry_run]  # the query ran, once
        assert len(standin.sessions) == 1 and standin.reads == []  # the result's session estimated, nothing read
    message = str(refused.value)
    assert re.fullmatch(rf"{registry}\.wide: the read of the query source's query result {re.escape(result)} would"
                        r" scan 52,000,000 bytes in BigQuery, over maximum_bytes_billed 20,000,000; its query job \S+"
                        r" already ran \(10,485,760 bytes billed\), its result is not read", message), message
    assert "nothing read" not in message
    status, error, _, details = last_audit(pg, registry)
    assert status == "failed" and error == message, (status, error)
    assert details["context"]["query_billed_bytes"] == 10_485_760, details


def cli_dry_run(table: str) -> str:
    """``bq-refresh run --table T --dry-run`` through the real entry point (its environment: this test's)."""
    import os
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    from tests.conftest import ROOT

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--table", table, "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_dry_run_reports_what_a_run_would_read_and_bill_and_the_audit_row_records_it(
        pg: psycopg.Connection[Any], registry: str, source: BigQuerySource, recorder: RecordingProxy) -> None:
    put_table(source, "orders", SCHEMA, rows(80))
    query = f"SELECT id, amount FROM `{source.table_ref('orders')}`"
    register_table(pg, registry, "amounts", {"query": query, "key": ["id"], "mode": "full"})  # no budget
    recorder.rewrite = set_bytes(123_456, 10_485_760)
    summary = refresh_table("amounts", dry_run=True)
    figures = summary["bigquery_bytes"]
    assert figures["query_estimated"] == 123_456 and figures["query_billed"] == 10_485_760, figures
    assert "read_estimated" in figures
    assert last_audit(pg, registry)[2]["bigquery_bytes"] == figures
    assert pg.execute(f'SELECT count(*) FROM "{registry}".amounts').fetchone() == (0,)  # nothing published
    printed = cli_dry_run(f"{registry}.amounts")
    assert re.search(rf"^{re.escape(registry)}\.amounts: BigQuery: read session estimate [\d,]+ bytes; query 123,456"
                     r" bytes estimated \(dry run\), 123,456 processed, 10,485,760 billed$", printed, re.M), printed

    result = refresh_table("amounts")
    assert result["bigquery_bytes"]["query_processed"] == 123_456
    assert last_audit(pg, registry)[2]["bigquery_bytes"]["query_billed"] == 10_485_760
    assert sum(r["amount"] for r in pg_rows(pg, f'"{registry}".amounts', "id")) == sum(
        Decimal(i) / 100 for i in range(80))


def test_doctor_compares_each_budget_with_bigquerys_estimate(
        pg: psycopg.Connection[Any], registry: str, source: BigQuerySource, recorder: RecordingProxy,
        resources: Any, env: Settings) -> None:
    """bq-refresh doctor says beforehand what a run would refuse: a query's dry run over its budget fails; a
    full-mode table's whole read over it fails, an incremental table's warns (its first load or a full refresh
    would be refused)."""
    from blocks import Resources
    from tasks.doctor import line, source_checks
    from tasks.registry import get_entry

    put_table(source, "orders", SCHEMA, rows(20))
    with StorageStandIn() as standin:
        standin.register(source.table_ref("orders"), rows(20), estimated_bytes=52_000)
        res = Resources(source=BigQuerySource(project_id=source.project_id, dataset=source.dataset,
                                              api_endpoint=recorder.url, storage_endpoint=standin.target,
                                              timeout_s=30),
                        target=resources.target, settings=resources.settings)
        query = f"SELECT id FROM `{source.table_ref('orders')}`"
        register_table(pg, registry, "q", {"query": query, "key": ["id"], "mode": "full", "maximum_bytes_billed": 1000})
        register_table(pg, registry, "full", {"source": "orders", "key": ["id"], "mode": "full",
                                             "maximum_bytes_billed": 10_000})
        register_table(pg, registry, "inc", {"source": "orders", "key": ["id"], "cursor": "day",
                                            "maximum_bytes_billed": 10_000})
        register_table(pg, registry, "roomy", {"source": "orders", "key": ["id"], "mode": "full",
                                              "maximum_bytes_billed": 60_000})
        recorder.rewrite = set_bytes(5000)
        lines = {name: [line(c) for c in source_checks(res, get_entry(pg, registry, name))]
                 for name in ("q", "full", "inc", "roomy")}
    s = registry
    assert lines["q"][-1] == (f"FAIL    budget {s}.q: its query would scan 5,000 bytes in BigQuery, over"
                              " maximum_bytes_billed 1,000: the run would be refused; raise maximum_bytes_billed or"
                              " read less (columns, a query)"), lines["q"]
    assert lines["full"][-1] == (f"FAIL    budget {s}.full: a whole read would scan 52,000 bytes in BigQuery, over"
                                 " maximum_bytes_billed 10,000: the run would be refused; raise maximum_bytes_billed"
                                 " or read less (columns, a query)"), lines["full"]
    assert lines["inc"][-1].startswith(f"WARN    budget {s}.inc: a whole read (a first load or full refresh) would"
                                       " scan 52,000 bytes"), lines["inc"]
    assert lines["roomy"][-1] == (f"OK      budget {s}.roomy: a whole read would scan 52,000 bytes, within"
                                  " maximum_bytes_billed 60,000"), lines["roomy"]
