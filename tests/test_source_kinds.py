"""Source kinds and where they live: a logical view (or a non-BigLake external table, or a materialized view) is read
through a query job, because the Storage Read API reads tables only (cloud.google.com/bigquery/docs/reference/storage,
"Limitations": it cannot "directly read from logical or materialized views"; tests/storage_standin.py refuses them as
BigQuery does). On BigQuery the job's own anonymous result table is read (no write right, nothing left behind, no
time travel: a result table never changes); on the emulator, which cannot read a result table through its Storage
API, the result is written into a named table by DDL (the source's capability ``reads_query_results``). Jobs carry
the dataset's location, taken from its metadata when none is configured."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

import polars as pl
import psycopg
import pyarrow as pa
import pytest
from google.cloud import bigquery

from blocks import BigQuerySource
from bq_refresh.errors import ConfigError, SourceError
from bq_refresh.services import EmulatorEndpoints
from bq_refresh.settings import Settings
from flows.refresh_table import refresh_table
from tasks import extract
from tasks.registry import register_table
from tasks.sources import keeps_history, read_route, resolve_source, result_table_name
from tasks.transform import register_transform
from tests.bqdata import bq_schema, pg_rows, put_table, run_sql, source_rows
from tests.bqrecorder import RecordingProxy
from tests.comparator import assert_same_rows
from tests.conftest import EMULATOR_PROJECT
from tests.storage_standin import StorageStandIn, table_path

pytestmark = [pytest.mark.once, pytest.mark.second]

SCHEMA = bq_schema([("id", "INT64", "REQUIRED"), ("day", "DATE"), ("name", "STRING"), ("amount", "NUMERIC")])


def rows(n: int) -> pa.Table:
    from decimal import Decimal

    return pa.table({"id": list(range(n)), "day": [date(2026, 1, 1) + timedelta(days=i % 9) for i in range(n)],
                     "name": [f"name {i}" if i % 7 else None for i in range(n)],
                     "amount": [Decimal(i) / 100 for i in range(n)]},
                    schema=pa.schema([pa.field("id", pa.int64(), nullable=False), ("day", pa.date32()),
                                      ("name", pa.string()), ("amount", pa.decimal128(38, 9))]))


@pytest.mark.parametrize(("table_type", "connection", "route"), [
    ("TABLE", False, "read_session"), ("SNAPSHOT", False, "read_session"), (None, False, "read_session"),
    ("EXTERNAL", True, "read_session"),  # BigLake: an external table with a connection
    ("EXTERNAL", False, "query"), ("VIEW", False, "query"), ("MATERIALIZED_VIEW", False, "query"),
])
def test_each_kind_of_source_is_routed_where_bigquery_can_read_it(table_type: str | None, connection: bool,
                                                                  route: str) -> None:
    assert read_route(table_type, connection=connection) == route


@pytest.mark.parametrize(("kind", "past"), [("table", True), ("view", False), ("materialized_view", False),
                                            ("external", False), ("snapshot", False)])
def test_only_a_tables_past_is_read_by_time_travel(kind: str, past: bool) -> None:
    """bq-refresh verify reads a table as of the last run's snapshot; a view's time travel would read its past
    definition over today's data, so a view is read as it is now (and verify says so)."""
    assert keeps_history(kind) is past


@pytest.mark.emulator
@pytest.mark.usefixtures("prefect_harness")
def test_a_view_source_refreshes_through_a_query_and_equals_the_view(
        env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource,
        emulator: EmulatorEndpoints, monkeypatch: pytest.MonkeyPatch) -> None:
    put_table(source, "orders", SCHEMA, rows(500))
    run_sql(source, f"CREATE VIEW `{source.table_ref('recent')}` AS SELECT id, day, name, amount"
                    f" FROM `{source.table_ref('orders')}` WHERE MOD(id, 3) <> 0")
    register_table(pg, registry, "recent", {"source": "recent", "key": ["id"], "mode": "full"})
    proxy = RecordingProxy(emulator.rest_url)
    try:
        monkeypatch.setenv("BIGQUERY_API_ENDPOINT", proxy.url)
        result = refresh_table("recent")
    finally:
        proxy.close()
    assert result["status"] == "success" and result["rows_inserted"] == 333, result
    counts = [r.query for r in proxy.jobs() if "COUNT(" in r.query]
    assert counts and all("_bqr_query_" in q and "`recent`" not in q for q in counts), counts  # the job's result
    # the emulator's way: the view's result written by DDL into a table of ours, read from there
    audit = pg.execute(f'SELECT bigquery_job_id, sync_metadata FROM "{registry}".refresh_audit_log'
                       " ORDER BY id DESC LIMIT 1").fetchone()
    assert audit is not None and audit[0] and "sessions" not in audit[0], audit  # the query job's id
    assert set(audit[1]["bigquery_bytes"]) >= {"read_estimated", "query_processed", "query_billed"}
    assert_same_rows(source_rows(source, "recent"), pg_rows(pg, f'"{registry}".recent', "id"), ["id"])


@pytest.fixture
def standin() -> Any:
    with StorageStandIn() as server:
        yield server


@pytest.fixture
def recorder(emulator: EmulatorEndpoints) -> Any:
    proxy = RecordingProxy(emulator.rest_url)
    yield proxy
    proxy.close()


def read_all(source: BigQuerySource, table: extract.SourceTable) -> tuple[extract.ReadSessionInfo, pa.Table]:
    """Every row of ``table`` through a read session, as the refresh reads it."""
    session = extract.create_session(source, table, selected_fields=[f.name for f in table.fields],
                                     row_restriction="", snapshot_time=datetime.now(UTC) - timedelta(seconds=1),
                                     max_streams=2, table_name="t")
    schema = pa.ipc.read_schema(pa.py_buffer(session.arrow_schema))
    client = source.get_read_client()
    batches = [b for s in session.streams for b, _ in extract.read_stream(client, s, 0, schema, table_name="t")]
    return session, pa.Table.from_batches(batches, schema=schema)


@pytest.mark.emulator
def test_a_view_is_read_from_its_query_jobs_anonymous_result_table_without_writing_anything(
        dataset: str, emulator: EmulatorEndpoints, standin: StorageStandIn, recorder: RecordingProxy) -> None:
    """BigQuery's way (REST on the emulator, Storage Read on the stand-in): the job's destination is read, with no
    snapshot modifier; no DDL, no table created; the view itself is never given to the Storage Read API (the
    stand-in refuses it, as BigQuery does)."""
    source = BigQuerySource(project_id=EMULATOR_PROJECT, dataset=dataset, api_endpoint=recorder.url,
                            storage_endpoint=standin.target, query_results_readable=True, timeout_s=30)
    put_table(source, "orders", SCHEMA, rows(200))
    view = source.table_ref("recent")
    run_sql(source, f"CREATE VIEW `{view}` AS SELECT * FROM `{source.table_ref('orders')}` WHERE MOD(id, 4) = 1")
    expected = source_rows(source, "recent")
    standin.register(view, rows(1), kind="VIEW")  # a session on the view itself would be refused
    standin.register(source.table_ref("orders"), rows(200))

    def serve_result(seen: Any, answer: dict[str, Any]) -> None:
        dest = answer.get("configuration", {}).get("query", {}).get("destinationTable")
        if dest and not answer.get("configuration", {}).get("dryRun"):
            ref = f"{dest['projectId']}.{dest['datasetId']}.{dest['tableId']}"
            if table_path(ref) not in standin._tables:  # what BigQuery keeps for the job: its result rows
                standin.register(ref, pa.Table.from_pylist(expected, schema=rows(0).schema))

    recorder.rewrite = serve_result
    recorder.requests.clear()
    resolved = resolve_source(source, table="s.recent", source_ref="recent", query=None)
    assert resolved.kind == "view" and resolved.job_result and resolved.job_id
    assert resolved.ref.split(".")[1] == "_bqemu_anonymous", resolved.ref  # the job's own result table
    session, table = read_all(source, resolved)
    [record] = standin.sessions
    assert record.table == table_path(resolved.ref) and record.snapshot_time is None and record.error is None
    queries = [r.query for r in recorder.jobs()]
    assert queries == [f"SELECT * FROM `{view}`"], queries  # one query, no CREATE ... AS, no destination asked
    assert not any(r.method in {"POST", "PUT", "PATCH"} and "/tables" in r.path for r in recorder.requests)
    assert_same_rows(expected, table.to_pylist(), ["id"])


@pytest.mark.emulator
def test_a_result_too_large_for_an_anonymous_table_names_materialization_dataset(
        dataset: str, standin: StorageStandIn, recorder: RecordingProxy) -> None:
    source = BigQuerySource(project_id=EMULATOR_PROJECT, dataset=dataset, api_endpoint=recorder.url,
                            storage_endpoint=standin.target, query_results_readable=True, timeout_s=30)
    put_table(source, "orders", SCHEMA, rows(10))

    def too_large(seen: Any) -> tuple[int, dict[str, Any]] | None:
        if seen.job_insert and not seen.dry_run:  # what BigQuery answers (reason responseTooLarge, HTTP 403)
            message = "Response too large to return. Consider specifying a destination table in your job configuration."
            return 403, {"error": {"code": 403, "message": message, "status": "PERMISSION_DENIED",
                                   "errors": [{"reason": "responseTooLarge", "message": message}]}}
        return None

    recorder.answer = too_large
    with pytest.raises(SourceError, match=r"^s\.big: the query source's result is too large for an anonymous result"
                                          r" table .*set materialization_dataset") as caught:
        resolve_source(source, table="s.big", source_ref=None, query=f"SELECT * FROM `{source.table_ref('orders')}`")
    assert "\n" not in str(caught.value)


@pytest.mark.emulator
def test_jobs_carry_the_datasets_location_from_its_metadata_and_a_stuck_query_is_cancelled_there(
        emulator: EmulatorEndpoints, recorder: RecordingProxy) -> None:
    name = f"ds_eu_{datetime.now(UTC).strftime('%H%M%S%f')}"
    admin = BigQuerySource(project_id=EMULATOR_PROJECT, dataset=name, api_endpoint=emulator.rest_url,
                           storage_endpoint=emulator.grpc_target)
    ds = bigquery.Dataset(f"{EMULATOR_PROJECT}.{name}")
    ds.location = "asia-northeast1"
    admin.get_bigquery_client().create_dataset(ds)
    other = bigquery.Dataset(f"{EMULATOR_PROJECT}.{name}_us")
    other.location = "US"
    admin.get_bigquery_client().create_dataset(other)
    try:
        put_table(admin, "orders", SCHEMA, rows(10))
        source = BigQuerySource(project_id=EMULATOR_PROJECT, dataset=name, api_endpoint=recorder.url,
                                storage_endpoint=emulator.grpc_target, timeout_s=3)  # no location configured
        query = f"SELECT * FROM `{source.table_ref('orders')}`"
        resolve_source(source, table="s.t", source_ref=None, query=query, maximum_bytes_billed=10**9)
        inserts = recorder.jobs()
        assert [r.dry_run for r in inserts] == [True, False]
        assert {r.body["jobReference"]["location"] for r in inserts if r.body} == {"asia-northeast1"}, inserts

        recorder.requests.clear()

        def never_done(_: Any, answer: dict[str, Any]) -> None:  # the job runs on past the deadline
            if isinstance(answer.get("status"), dict):
                answer["status"] = {"state": "RUNNING"}
            if "jobComplete" in answer:
                answer["jobComplete"] = False

        recorder.rewrite = never_done
        stuck = source.model_copy(update={"query_timeout_s": 3.0})  # BIGQUERY_QUERY_TIMEOUT_SECONDS
        with pytest.raises(SourceError, match=r"^s\.t: the query source's query job \S+ ran longer than"
                                              r" BIGQUERY_QUERY_TIMEOUT_SECONDS \(3 s\) and was cancelled"):
            resolve_source(stuck, table="s.t", source_ref=None, query=query)
        cancels = [r for r in recorder.requests if r.path.endswith("/cancel")]
        assert cancels and cancels[0].params.get("location") == "asia-northeast1", recorder.requests

        recorder.rewrite = None
        with pytest.raises(SourceError, match=rf"materialization_dataset {EMULATOR_PROJECT}\.{name}_us is in US,"
                                              " the source's query runs in asia-northeast1"):
            resolve_source(source, table="s.t", source_ref=None, query=query, materialization_dataset=f"{name}_us")
    finally:
        for n in (name, f"{name}_us"):
            admin.get_bigquery_client().delete_dataset(n, delete_contents=True, not_found_ok=True)


@pytest.mark.emulator
@pytest.mark.usefixtures("prefect_harness")
def test_a_query_job_running_longer_than_the_bigquery_timeout_is_waited_for(
        env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource,
        emulator: EmulatorEndpoints, monkeypatch: pytest.MonkeyPatch) -> None:
    """BIGQUERY_TIMEOUT_SECONDS is how long a BigQuery that gives no answer is tried, not a cap on a job that runs:
    a query job that BigQuery reports RUNNING (through the recording proxy) for longer than it, then DONE, is
    waited for, each look at it one short request, and the refresh equals the query."""
    put_table(source, "orders", SCHEMA, rows(150))
    query = f"SELECT id, day, name, amount FROM `{source.table_ref('orders')}` WHERE MOD(id, 5) <> 2"
    register_table(pg, registry, "slow", {"query": query, "key": ["id"], "mode": "full"})
    expected = [dict(r.items()) for r in source.get_bigquery_client().query(query).result()]
    runs_until: dict[str, float] = {}  # the job's id -> when BigQuery first reports it DONE
    proxy = RecordingProxy(emulator.rest_url)
    proxy.rewrite = reported_running(lambda text: query in text, 4.0, runs_until)  # twice BIGQUERY_TIMEOUT_SECONDS
    try:
        monkeypatch.setenv("BIGQUERY_API_ENDPOINT", proxy.url)
        monkeypatch.setenv("BIGQUERY_TIMEOUT_SECONDS", "2")
        started = time.monotonic()
        result = refresh_table("slow")
        waited = time.monotonic() - started
    finally:
        proxy.close()
    assert result["status"] == "success" and result["rows_inserted"] == len(expected), result
    [job_id] = runs_until
    looks = [r for r in proxy.requests if r.method == "GET" and r.path.endswith(f"/jobs/{job_id}")]
    assert len(looks) >= 3 and waited > 4.0, (len(looks), waited)  # polled past the 2 s budget, not given up
    assert_same_rows(expected, pg_rows(pg, f'"{registry}".slow', "id"), ["id"])


@pytest.mark.emulator
def test_doctor_says_a_view_is_read_through_a_query_job(
        env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource, resources: Any) -> None:
    from tasks.doctor import line, source_checks
    from tasks.registry import get_entry

    put_table(source, "orders", SCHEMA, rows(5))
    view = source.table_ref("recent")
    run_sql(source, f"CREATE VIEW `{view}` AS SELECT * FROM `{source.table_ref('orders')}`")
    register_table(pg, registry, "recent", {"source": "recent", "key": ["id"], "mode": "full"})
    lines = [line(c) for c in source_checks(resources, get_entry(pg, registry, "recent"))]
    assert lines[0] == f"OK      source {registry}.recent: {view} is a VIEW, read through a query job (dry run: 0 bytes)", lines
    assert not any(c.startswith("FAIL") for c in lines), lines


@pytest.mark.emulator
@pytest.mark.usefixtures("prefect_harness")
def test_a_resumed_query_source_reads_its_earlier_jobs_result_found_by_id_in_its_location(
        env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource, resources: Any,
        emulator: EmulatorEndpoints, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unfinished run of a query source is resumed on its query job's result (the checkpoint's offsets count
    its rows): the job is found by id, in the location its dataset's metadata gives, and the query is not run
    (nor paid for) again, even though the source changed meanwhile; the run's data is as of that job."""
    from blocks import Resources
    from tasks import sync
    from tasks.registry import get_entry

    put_table(source, "orders", SCHEMA, rows(90))
    query = f"SELECT id, day, amount FROM `{source.table_ref('orders')}` WHERE MOD(id, 3) = 0"
    register_table(pg, registry, "thirds", {"query": query, "key": ["id"], "mode": "full"})
    at_first = [dict(r.items()) for r in source.get_bigquery_client().query(query).result()]
    proxy = RecordingProxy(emulator.rest_url)
    try:
        monkeypatch.setenv("BIGQUERY_API_ENDPOINT", proxy.url)
        res = Resources(source=BigQuerySource.from_settings(Settings()), target=resources.target,
                        settings=resources.settings)
        first = sync.plan_refresh(res, get_entry(pg, registry, "thirds"))  # the run that stops after planning
        job_id = first.bigquery_job_id
        assert job_id and first.source_job_result and first.source_location, first
        put_table(source, "orders", SCHEMA, rows(300))  # BigQuery moved on meanwhile
        proxy.requests.clear()
        result = refresh_table("thirds")
        assert result["status"] == "success" and result["resumed"] is True, result
        assert not [r for r in proxy.jobs() if query in r.query], "the query ran again"
        fetched = [r for r in proxy.requests if r.method == "GET" and r.path.endswith(f"/jobs/{job_id}")]
        assert fetched and fetched[0].params.get("location") == first.source_location, proxy.requests
    finally:
        proxy.close()
    assert_same_rows(at_first, pg_rows(pg, f'"{registry}".thirds', "id"), ["id"])


@pytest.mark.emulator
def test_a_materialization_dataset_names_the_result_table_bigquerys_way(
        dataset: str, standin: StorageStandIn, recorder: RecordingProxy) -> None:
    """With ``materialization_dataset`` the job is sent with that dataset's ``_bqr_query_<hash>`` table as its
    destination, replaced each run (WRITE_TRUNCATE), and that table is read: no snapshot modifier. The emulator
    does not write a job's destination, so the table is made here as BigQuery's job would have made it."""
    source = BigQuerySource(project_id=EMULATOR_PROJECT, dataset=dataset, api_endpoint=recorder.url,
                            storage_endpoint=standin.target, query_results_readable=True, timeout_s=30)
    put_table(source, "orders", SCHEMA, rows(40))
    query = f"SELECT * FROM `{source.table_ref('orders')}` WHERE id < 25"
    named = f"{EMULATOR_PROJECT}.{dataset}.{result_table_name('s.mat')}"
    run_sql(source, f"CREATE TABLE `{named}` AS {query}")
    expected = source_rows(source, named.split(".", 1)[1])
    standin.register(named, pa.Table.from_pylist(expected, schema=rows(0).schema))
    recorder.requests.clear()
    resolved = resolve_source(source, table="s.mat", source_ref=None, query=query, materialization_dataset=dataset)
    assert resolved.ref == named and resolved.job_result
    [job] = recorder.jobs()
    config = job.body["configuration"]["query"] if job.body else {}
    assert config["destinationTable"] == {"projectId": EMULATOR_PROJECT, "datasetId": dataset,
                                          "tableId": result_table_name("s.mat")}, config
    assert config["writeDisposition"] == "WRITE_TRUNCATE" and config["query"] == query, config
    _, table = read_all(source, resolved)
    assert standin.sessions[0].snapshot_time is None
    assert_same_rows(expected, table.to_pylist(), ["id"])


@pytest.mark.emulator
@pytest.mark.usefixtures("prefect_harness")
def test_on_the_emulator_a_materialization_dataset_holds_the_result_and_the_source_dataset_nothing(
        env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource) -> None:
    client = source.get_bigquery_client()
    mat = f"{source.dataset}_mat"
    client.create_dataset(mat)
    try:
        put_table(source, "orders", SCHEMA, rows(60))
        query = f"SELECT id, name FROM `{source.table_ref('orders')}` WHERE id >= 10"
        register_table(pg, registry, "names", {"query": query, "key": ["id"], "mode": "full",
                                              "materialization_dataset": mat})
        assert refresh_table("names")["status"] == "success"
        assert [t.table_id for t in client.list_tables(mat)] == [result_table_name(f"{registry}.names")]
        assert [t.table_id for t in client.list_tables(source.dataset)] == ["orders"]
        expected = [dict(r.items()) for r in client.query(query).result()]
        assert_same_rows(expected, pg_rows(pg, f'"{registry}".names', "id"), ["id"])
    finally:
        client.delete_dataset(mat, delete_contents=True, not_found_ok=True)


STOP_AFTER = {"batches": -1}  # the run of "stops_for_tests" ends after this many batches (-1: never)


@register_transform("stops_for_tests")
def _stops(frame: pl.LazyFrame) -> pl.LazyFrame:
    if STOP_AFTER["batches"] == 0:
        raise ConfigError("injected: the run stops here, its staged batches and checkpoint kept")
    STOP_AFTER["batches"] -= 1
    return frame


PLAN = {"source_job_result": True, "bigquery_job_id": "job_1", "source_ref": "p.d._bqr_query_1"}


@pytest.mark.parametrize(("plan", "source", "gone"), [
    (PLAN, extract.SourceTable("p.d._bqr_query_1", [], "job_1", job_result=True, reused=True), False),
    (PLAN, extract.SourceTable("p.d._bqr_query_1", [], "job_2", job_result=True), True),  # the DDL route, run again
    (PLAN, extract.SourceTable("p._anon.t2", [], "job_2", job_result=True), True),  # a new anonymous result
    (PLAN, extract.SourceTable("p.d.orders", []), True),  # now a table source
    ({"source_job_result": False}, extract.SourceTable("p.d.orders", []), False),  # not a job's result
])
def test_a_checkpoint_on_a_query_jobs_result_resumes_only_on_that_same_result(
        plan: dict[str, Any], source: extract.SourceTable, gone: bool) -> None:
    from tasks.sync import result_gone

    assert (result_gone(plan, source) is not None) is gone


@pytest.mark.emulator
@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("lost", ["result table dropped", "job not found"])
def test_a_query_source_whose_earlier_result_is_gone_starts_over_and_says_why(
        lost: str, env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource,
        emulator: EmulatorEndpoints, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run of a query source stopped after staging some batches; its query job's result then becomes unreadable
    (the table gone, as an expired anonymous result; or the job unknown) while the source changed. The rerun runs the
    query again, which (the emulator's DDL route, like a materialization_dataset) replaces the result table: the old
    checkpoint's offsets count rows of the earlier result, so it is not resumed: the run starts over, the audit row
    says why, and the target equals the query's rows now, nothing doubled."""
    put_table(source, "orders", SCHEMA, rows(150))
    query = f"SELECT id, day, name, amount FROM `{source.table_ref('orders')}` WHERE MOD(id, 4) <> 3"
    register_table(pg, registry, "quarters", {"query": query, "key": ["id"], "mode": "full", "batch_size": 20,
                                              "transform": "stops_for_tests", "direct_initial_load": False})
    STOP_AFTER["batches"] = 2
    try:
        with pytest.raises(ConfigError, match="injected"):
            refresh_table("quarters")
    finally:
        STOP_AFTER["batches"] = -1
    ckpt = pg.execute(f"SELECT id, last_processed_row, checkpoint_data->'plan' FROM \"{registry}\".refresh_checkpoints"
                      " WHERE status = 'active'").fetchone()
    assert ckpt is not None and ckpt[1] == 40, ckpt  # two batches staged, then stopped
    job_id, result_ref = ckpt[2]["bigquery_job_id"], ckpt[2]["source_ref"]

    put_table(source, "orders", SCHEMA, rows(210))  # the source moved on: the query's rows now differ
    proxy = RecordingProxy(emulator.rest_url)
    if lost == "result table dropped":
        source.get_bigquery_client().delete_table(result_ref)
    else:
        def unknown_job(seen: Any) -> tuple[int, dict[str, Any]] | None:
            if seen.method == "GET" and seen.path.endswith(f"/jobs/{job_id}"):
                message = f"Not found: Job {EMULATOR_PROJECT}:{job_id}"
                return 404, {"error": {"code": 404, "message": message, "status": "NOT_FOUND",
                                       "errors": [{"reason": "notFound", "message": message}]}}
            return None

        proxy.answer = unknown_job
    try:
        monkeypatch.setenv("BIGQUERY_API_ENDPOINT", proxy.url)
        rerun = refresh_table("quarters")
    finally:
        proxy.close()
    expected = [dict(r.items()) for r in source.get_bigquery_client().query(query).result()]
    assert rerun["status"] == "success" and not rerun["resumed"], rerun
    assert rerun["rows_read"] == rerun["rows_inserted"] == len(expected) == 158, rerun  # read whole, once
    restarted = pg.execute(f"SELECT sync_metadata->>'restarted' FROM \"{registry}\".refresh_audit_log"
                           " ORDER BY id DESC LIMIT 1").fetchone()
    assert restarted is not None and restarted[0] == (
        f"the unfinished run of checkpoint {ckpt[0]} is not resumed: the result {result_ref} of its query job"
        f" {job_id} can no longer be read (expired, not found or replaced)"), restarted
    assert_same_rows(expected, pg_rows(pg, f'"{registry}".quarters', "id"), ["id"])
    assert pg.execute(f'SELECT count(*) - count(DISTINCT id) FROM "{registry}".quarters').fetchone() == (0,)


def reported_running(matches: Any, seconds: float, runs_until: dict[str, float]) -> Any:
    """A rewrite for the recording proxy: a query job whose text ``matches`` is reported RUNNING (jobs.get, and
    getQueryResults' jobComplete) for ``seconds`` after it is inserted, then as BigQuery answered; ``runs_until``
    collects the job ids."""
    def rewrite(seen: Any, answer: dict[str, Any]) -> None:
        job_id = str((answer.get("jobReference") or {}).get("jobId"))
        if seen.job_insert and not seen.dry_run and matches(seen.query):
            runs_until[job_id] = time.monotonic() + seconds
        if time.monotonic() < runs_until.get(job_id, 0.0):
            if isinstance(answer.get("status"), dict):
                answer["status"] = {"state": "RUNNING"}
            if "jobComplete" in answer:
                answer["jobComplete"] = False
    return rewrite


@pytest.mark.emulator
def test_the_count_queries_running_longer_than_the_bigquery_timeout_are_waited_for(
        env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource,
        emulator: EmulatorEndpoints, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reconciliation's and the checks' count queries over a table source are jobs like a query source's: one
    that BigQuery reports RUNNING for longer than BIGQUERY_TIMEOUT_SECONDS is waited for, not taken for an
    unreachable BigQuery."""
    put_table(source, "orders", SCHEMA, rows(60))
    register_table(pg, registry, "orders", {"source": "orders", "key": ["id"], "mode": "full"})
    runs_until: dict[str, float] = {}
    proxy = RecordingProxy(emulator.rest_url)
    proxy.rewrite = reported_running(lambda text: "COUNT(" in text, 3.0, runs_until)
    try:
        monkeypatch.setenv("BIGQUERY_API_ENDPOINT", proxy.url)
        monkeypatch.setenv("BIGQUERY_TIMEOUT_SECONDS", "1")
        result = refresh_table("orders")
    finally:
        proxy.close()
    assert result["status"] == "success" and result["rows_inserted"] == 60, result
    assert runs_until, [r.query for r in proxy.jobs()]
    assert_same_rows(source_rows(source, "orders"), pg_rows(pg, f'"{registry}".orders', "id"), ["id"])
