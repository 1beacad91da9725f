"""The read path against BigQuery's Storage Read API as documented, through the real Google client talking to the
stand-in (tests/storage_standin.py) over a socket: offsets honoured (or ignored, as the local emulator does), a call
failing mid-stream (UNAVAILABLE, RESOURCE_EXHAUSTED with and without RetryInfo) resumed with no row skipped or read
twice, a session expiring mid-read continued by a new one at the same snapshot, a checkpoint older than the
dataset's time travel window started over with its audit note, and a logical view refused with an error naming it.

Rows are compared value by value with the independent comparator (tests/comparator.py). The whole refreshes read
REST (schemas, counts) from the emulator and Storage Read from the stand-in, the same rows registered in both.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pyarrow as pa
import pytest

from blocks import BigQuerySource
from bq_refresh.errors import SourceError, SourceUnavailable
from bq_refresh.settings import Settings
from tasks import extract
from tests.bqdata import assert_same_rows, pg_rows, put_table, source_rows
from tests.conftest import EMULATOR_PROJECT
from tests.storage_standin import StorageStandIn
from tests.test_engine import SQP_KEY, SQP_SCHEMA, T0, sqp_rows

REF = "p.d.sqp"


@pytest.fixture
def standin() -> Iterator[StorageStandIn]:
    with StorageStandIn(rows_per_message=100) as server:
        yield server


def source_for(standin: StorageStandIn, *, honours: bool) -> BigQuerySource:
    """The product's block pointed at the stand-in for Storage Read, saying how it treats offsets."""
    return BigQuerySource(project_id="p", dataset="d", storage_endpoint=standin.target,
                          storage_honours_offsets=honours, timeout_s=10)


def open_session(source: BigQuerySource, *, ref: str = REF, fields: list[str] | None = None, restriction: str = "",
                 streams: int = 1, snapshot: datetime | None = None) -> extract.ReadSessionInfo:
    return extract.create_session(
        source, extract.SourceTable(ref, []), selected_fields=fields or [], row_restriction=restriction,
        snapshot_time=snapshot or datetime.now(UTC) - timedelta(seconds=1), max_streams=streams, table_name="t.sqp")


def read(source: BigQuerySource, info: extract.ReadSessionInfo, stream: int = 0, offset: int = 0,
         stall_s: float = 10) -> list[dict[str, Any]]:
    """One stream through the product's read_stream, from ``offset``, as rows."""
    schema = pa.ipc.read_schema(pa.py_buffer(info.arrow_schema))
    batches = [b for b, _ in extract.read_stream(source.get_read_client(), info.streams[stream], offset, schema,
                                                 table_name="t.sqp", server_offsets=source.honours_read_offset,
                                                 stall_timeout_s=stall_s)]
    return pa.Table.from_batches(batches, schema).to_pylist()


# --- the read path (no PostgreSQL) ---------------------------------------------------------------------------------

@pytest.mark.once
@pytest.mark.second
def test_a_session_selects_restricts_and_splits_as_bigquery_does(standin: StorageStandIn) -> None:
    data = sqp_rows(1000, step=timedelta(seconds=1))
    standin.register(REF, data)
    source = source_for(standin, honours=True)
    floor = T0 + timedelta(seconds=400)
    info = open_session(source, fields=["updated_at", "asin", "start_date", "search_query"], streams=3,
                        restriction=f"`updated_at` >= TIMESTAMP '{floor.isoformat()}'")

    expected = [{k: r[k] for k in ("start_date", "asin", "search_query", "updated_at")}
                for r in data.to_pylist() if r["updated_at"] >= floor]
    assert len(info.streams) == 3 and info.estimated_rows == len(expected) == 600
    assert pa.ipc.read_schema(pa.py_buffer(info.arrow_schema)).names == ["start_date", "asin", "search_query",
                                                                        "updated_at"]  # the table's order
    got = [row for i in range(3) for row in read(source, info, i)]
    assert_same_rows(expected, got, SQP_KEY)
    asked = standin.sessions[-1]
    assert asked.row_restriction.startswith("`updated_at` >=") and asked.compression == "lz4"
    assert asked.snapshot_time is not None and abs(asked.snapshot_time - (datetime.now(UTC))) < timedelta(seconds=30)


@pytest.mark.once
@pytest.mark.second
@pytest.mark.parametrize("honours", [True, False], ids=["offsets-honoured", "offsets-ignored"])
def test_a_read_continues_at_its_checkpointed_offset(standin: StorageStandIn, honours: bool) -> None:
    """A checkpoint's offset falls inside a server message: the read yields exactly the rows from it, whether the
    server starts there (BigQuery) or at row 0 (the emulator: the rows before it are dropped by the product)."""
    standin.honour_offsets = honours
    data = sqp_rows(700)
    standin.register(REF, data)
    source = source_for(standin, honours=honours)
    info = open_session(source)
    assert_same_rows(data.slice(137).to_pylist(), read(source, info, offset=137), SQP_KEY)
    assert [(r.offset, r.started_at) for r in standin.reads] == [(137, 137 if honours else 0)]


FAULTS: dict[str, dict[str, Any]] = {
    "unavailable": {"kind": "UNAVAILABLE"},
    "resource-exhausted-retryinfo": {"kind": "RESOURCE_EXHAUSTED", "retry_delay_s": 0.6},
    "resource-exhausted": {"kind": "RESOURCE_EXHAUSTED"},
    "internal-rst-stream": {"kind": "INTERNAL", "message": "Received RST_STREAM with error code 2"},
}


@pytest.mark.once
@pytest.mark.second
@pytest.mark.parametrize("honours", [True, False], ids=["offsets-honoured", "offsets-ignored"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_call_failing_mid_stream_is_resumed_with_no_row_skipped_or_read_twice(
    standin: StorageStandIn, honours: bool, fault: str,
) -> None:
    """The call fails once its stream reaches row 350 (after 3.5 messages); the product resumes at row 350 after
    a pause (RetryInfo's delay when sent: 0.6 s here; else a backoff of at least 0.25 s), and every row of the stream,
    from the checkpoint's 120, comes once."""
    standin.honour_offsets = honours
    data = sqp_rows(900)
    standin.register(REF, data)
    standin.fail_mid_stream(at_row=350, **FAULTS[fault])
    source = source_for(standin, honours=honours)
    info = open_session(source)

    started = time.monotonic()
    assert_same_rows(data.slice(120).to_pylist(), read(source, info, offset=120), SQP_KEY)
    assert time.monotonic() - started >= FAULTS[fault].get("retry_delay_s", 0.25)
    calls = [(r.offset, r.started_at, r.ended) for r in standin.reads]
    assert calls == [(120, 120 if honours else 0, FAULTS[fault]["kind"]),
                     (350, 350 if honours else 0, "ok")], calls


@pytest.mark.once
@pytest.mark.second
def test_a_stream_that_keeps_failing_gives_up_within_the_deadline(standin: StorageStandIn) -> None:
    standin.register(REF, sqp_rows(500))
    standin.fail_mid_stream("UNAVAILABLE", at_row=200, times=-1)
    source = source_for(standin, honours=True)
    info = open_session(source)
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match="failed mid-read: gave up retrying") as failure:
        read(source, info, stall_s=1.5)
    assert time.monotonic() - started < 5
    assert "t.sqp" in str(failure.value) and "at row 200" in str(failure.value), failure.value
    calls = len(standin.reads)
    assert calls >= 2  # resumed with a backoff until the deadline
    time.sleep(0.7)
    assert len(standin.reads) == calls  # and then stopped


@pytest.mark.once
@pytest.mark.second
def test_a_slow_consumer_is_not_a_stalled_stream(standin: StorageStandIn) -> None:
    """The time the caller keeps each batch (a slow flush, a COPY shared with other streams) does not count against
    BIGQUERY_TIMEOUT_SECONDS: a call that fails after the caller was slow for longer is still resumed."""
    data = sqp_rows(500)
    standin.register(REF, data)
    standin.fail_mid_stream("UNAVAILABLE", at_row=200)
    source = source_for(standin, honours=True)
    info = open_session(source)
    schema = pa.ipc.read_schema(pa.py_buffer(info.arrow_schema))
    rows: list[dict[str, Any]] = []
    for batch, _ in extract.read_stream(source.get_read_client(), info.streams[0], 0, schema, table_name="t.sqp",
                                        server_offsets=True, stall_timeout_s=1.0):
        rows += batch.to_pylist()
        time.sleep(0.6)  # 2 batches before the fault: 1.2 s of the caller's time, past the 1 s budget
    assert_same_rows(data.to_pylist(), rows, SQP_KEY)


@pytest.mark.once
@pytest.mark.second
def test_a_stream_split_in_two_holds_the_same_rows_back_to_back(standin: StorageStandIn) -> None:
    """SplitReadStream through the real client: the primary and the remainder are the original, in order."""
    from google.cloud.bigquery_storage_v1 import types

    data = sqp_rows(500)
    standin.register(REF, data)
    source = source_for(standin, honours=True)
    info = open_session(source)
    split = source.get_read_client().split_read_stream(
        request=types.SplitReadStreamRequest(name=info.streams[0], fraction=0.3))
    halves = dataclasses.replace(info, streams=[split.primary_stream.name, split.remainder_stream.name])
    assert read(source, halves, 0) + read(source, halves, 1) == data.to_pylist()
    assert [len(read(source, halves, i)) for i in (0, 1)] == [150, 350]


@pytest.mark.once
@pytest.mark.second
def test_a_session_refused_for_quota_is_asked_again(standin: StorageStandIn) -> None:
    """RESOURCE_EXHAUSTED (429) on CreateReadSession is transient: asked again after a pause, within the deadline."""
    standin.register(REF, sqp_rows(50))
    standin.fail_create("RESOURCE_EXHAUSTED", times=1)
    assert open_session(source_for(standin, honours=True)).estimated_rows == 50
    assert [s.error for s in standin.sessions] == ["RESOURCE_EXHAUSTED", None]


@pytest.mark.once
@pytest.mark.second
def test_an_expired_session_is_said_so_for_the_caller_to_open_another(standin: StorageStandIn) -> None:
    standin.register(REF, sqp_rows(300))
    source = source_for(standin, honours=True)
    info = open_session(source)
    standin.advance(timedelta(hours=6, minutes=1))  # a read session lasts 6 hours
    with pytest.raises(extract.SessionExpired, match="FailedPrecondition: there was an error operating on .*"
                                                     "session expired at"):
        read(source, info)


@pytest.mark.once
@pytest.mark.second
@pytest.mark.parametrize("kind", ["VIEW", "MATERIALIZED_VIEW"])
def test_a_view_is_refused_with_an_error_naming_it(standin: StorageStandIn, kind: str) -> None:
    standin.register("p.d.sqp_view", sqp_rows(10), kind=kind)
    with pytest.raises(SourceError) as refused:
        open_session(source_for(standin, honours=True), ref="p.d.sqp_view")
    said = str(refused.value)
    assert said.startswith("t.sqp: p.d.sqp_view is not a table") and "query source" in said, said
    assert "non-table entities cannot be read with the storage API" in said  # BigQuery's own words kept
    assert len(standin.sessions) == 1 and (standin.sessions[0].error or "").startswith("INVALID_ARGUMENT")
    assert standin.reads == []


@pytest.mark.once
@pytest.mark.second
def test_a_snapshot_past_the_time_travel_window_is_refused_clearly(standin: StorageStandIn) -> None:
    standin.register(REF, sqp_rows(10), at=datetime.now(UTC) - timedelta(days=30))
    old = datetime.now(UTC) - timedelta(hours=170)
    with pytest.raises(SourceError, match=r"can no longer read p\.d\.sqp as of .*time travel window.*Invalid snapshot"):
        open_session(source_for(standin, honours=True), snapshot=old)
    assert open_session(source_for(standin, honours=True), snapshot=old + timedelta(hours=3)).estimated_rows == 10


@pytest.mark.once
@pytest.mark.second
@pytest.mark.parametrize(("age_h", "window_h", "gone"), [
    (1, 48, False), (46.9, 48, False), (47.1, 48, True), (100, 168, False), (167.5, 168, True), (200, 168, True),
])
def test_which_snapshots_a_resume_may_still_read(age_h: float, window_h: int, gone: bool) -> None:
    now = datetime(2026, 1, 10, tzinfo=UTC)
    why = extract.snapshot_out_of_reach(now - timedelta(hours=age_h), now, window_h)
    assert (why is not None) == gone
    if why:
        assert f"time travel window is {window_h} h" in why and "read afresh" in why


# --- whole refreshes: REST on the emulator, Storage Read on the stand-in -----------------------------------------------

@pytest.fixture
def on_standin(env: Settings, pg: psycopg.Connection[Any], standin: StorageStandIn,
               monkeypatch: pytest.MonkeyPatch) -> tuple[BigQuerySource, str]:
    """The test's table "sqp" in the emulator and, the same rows, in the stand-in; the environment reads through it."""
    from tasks.migrations import apply_migrations

    apply_migrations(pg, env.schema_name)
    source = BigQuerySource.from_settings(env)
    monkeypatch.setenv("BIGQUERY_STORAGE_ENDPOINT", standin.target)
    return source, f"{EMULATOR_PROJECT}.{env.bigquery_dataset}.sqp"


def register_sqp(pg: psycopg.Connection[Any], schema: str) -> None:
    from tasks.registry import register_table

    register_table(pg, schema, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at", "batch_size": 250,
                                       "streams": 2, "direct_initial_load": False})  # the staged, checkpointed path


@pytest.mark.emulator
@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("honours", [True, False], ids=["offsets-honoured", "offsets-ignored"])
def test_a_refresh_resumes_faults_and_continues_an_expired_session_at_the_same_snapshot(
    env: Settings, pg: psycopg.Connection[Any], standin: StorageStandIn, on_standin: tuple[BigQuerySource, str],
    monkeypatch: pytest.MonkeyPatch, honours: bool,
) -> None:
    """UNAVAILABLE on one stream, RESOURCE_EXHAUSTED on the other, then the session expires mid-read while a new
    version of the table lands: the run opens a new session at the SAME snapshot (the old version), reads it whole
    once, and the table equals the source at that snapshot, value by value."""
    from flows.refresh_table import refresh_table

    source, ref = on_standin
    schema = env.schema_name
    monkeypatch.setenv("BIGQUERY_STORAGE_HONOURS_OFFSETS", str(honours).lower())
    standin.honour_offsets = honours
    data = sqp_rows(3000)
    put_table(source, "sqp", SQP_SCHEMA, data)
    standin.register(ref, data)
    register_sqp(pg, schema)
    later = sqp_rows(3000, updated=T0 + timedelta(days=1), price_bump=Decimal(5))
    standin.fail_mid_stream("UNAVAILABLE", at_row=400, stream=0)
    standin.fail_mid_stream("RESOURCE_EXHAUSTED", at_row=300, stream=1)
    standin.fail_mid_stream("expire", at_row=1100, stream=0, on_hit=lambda: standin.register(ref, later))

    result = refresh_table("sqp")
    seen = (standin.sessions, standin.reads, standin.faults)
    assert result["status"] == "success" and result["session_recreated"] == 1, (result, seen)
    assert result["rows_inserted"] == 3000 and result["duplicate_keys"] == 0, (result, seen)
    assert_same_rows(source_rows(source, "sqp"), pg_rows(pg, f'"{schema}".sqp', "1"), SQP_KEY)
    assert len(standin.sessions) == 2, seen
    first, second = standin.sessions
    assert second.snapshot_time == first.snapshot_time  # the same snapshot, not "now" (the new version)
    assert [f.hits for f in standin.faults] == [1, 1, 1], seen
    resumed = [(r.offset, r.started_at) for r in standin.reads if r.stream == first.streams[0]]
    assert resumed[:2] == [(0, 0), (400, 400 if honours else 0)], resumed


@pytest.mark.emulator
@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize(("window_h", "age_h"), [(168, 200), (48, 60)], ids=["default-168h", "dataset-48h"])
def test_a_checkpoint_older_than_the_time_travel_window_starts_over_with_an_audit_note(
    env: Settings, pg: psycopg.Connection[Any], standin: StorageStandIn, on_standin: tuple[BigQuerySource, str],
    monkeypatch: pytest.MonkeyPatch, window_h: int, age_h: int,
) -> None:
    """A run stopped mid-read left its checkpoint; the rerun comes ``age_h`` hours later, past the dataset's time
    travel window (the emulator's 168 h; or 48 h, the dataset's maxTimeTravelHours as BigQuery would answer it, put
    into the emulator's answer by a recording proxy): it does not try to read as of the old snapshot (BigQuery would
    refuse it), starts over at a new one, and says so."""
    from flows.refresh_table import refresh_table
    from tests.bqrecorder import RecordingProxy

    source, ref = on_standin
    schema = env.schema_name
    monkeypatch.setenv("BIGQUERY_STORAGE_HONOURS_OFFSETS", "true")
    if window_h != 168:
        assert env.bigquery_api_endpoint is not None
        proxy = RecordingProxy(env.bigquery_api_endpoint)
        dataset_path = f"/datasets/{env.bigquery_dataset}"

        def dataset_window(seen: Any, answer: dict[str, Any]) -> None:
            if seen.method == "GET" and seen.path.endswith(dataset_path):
                answer["maxTimeTravelHours"] = str(window_h)

        proxy.rewrite = dataset_window
        monkeypatch.setenv("BIGQUERY_API_ENDPOINT", proxy.url)
    monkeypatch.setenv("BIGQUERY_TIMEOUT_SECONDS", "2")
    monkeypatch.setenv("REFRESH_RETRIES", "0")
    data = sqp_rows(3000)
    put_table(source, "sqp", SQP_SCHEMA, data)
    standin.register(ref, data, at=datetime.now(UTC) - timedelta(days=30), time_travel_hours=window_h)
    register_sqp(pg, schema)
    standin.fail_mid_stream("UNAVAILABLE", at_row=600, stream=0, times=-1)
    with pytest.raises(Exception, match="gave up retrying"):
        refresh_table("sqp")
    staged = pg.execute(f'SELECT id, last_processed_row, checkpoint_data #>> %s FROM "{schema}".refresh_checkpoints'
                        " WHERE status = 'active'", ("{session,snapshot_time}",)).fetchone()
    assert staged is not None and staged[1] >= 500, staged

    old = datetime.fromisoformat(staged[2]) - timedelta(hours=age_h)  # the run stopped age_h hours ago
    pg.execute(f'UPDATE "{schema}".refresh_checkpoints SET checkpoint_data = jsonb_set(checkpoint_data,'
               " '{session,snapshot_time}', to_jsonb(%s::text)) WHERE id = %s", (old.isoformat(), staged[0]))
    standin.expire_sessions()  # its read session is long gone too
    standin.faults.clear()
    sessions = len(standin.sessions)

    rerun = refresh_table("sqp")
    assert rerun["status"] == "success" and rerun["resumed"] is False and rerun["rows_read"] == 3000, rerun
    assert "not resumed" in rerun["restarted"] and f"time travel window is {window_h} h" in rerun["restarted"], rerun
    note = pg.execute(f'SELECT sync_metadata->>%s FROM "{schema}".refresh_audit_log ORDER BY id DESC LIMIT 1',
                      ("restarted",)).fetchone()
    assert note is not None and note[0] == rerun["restarted"]
    assert all(s.snapshot_time != old for s in standin.sessions[sessions:])  # never asked for the old snapshot
    assert all(s.error is None for s in standin.sessions[sessions:])
    assert_same_rows(source_rows(source, "sqp"), pg_rows(pg, f'"{schema}".sqp', "1"), SQP_KEY)


@pytest.mark.emulator
@pytest.mark.usefixtures("prefect_harness")
def test_a_direct_initial_load_whose_session_expires_continues_with_a_new_one_at_the_same_snapshot(
    env: Settings, pg: psycopg.Connection[Any], standin: StorageStandIn, on_standin: tuple[BigQuerySource, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first load of an empty table goes straight into it in one transaction; its session expires mid-read (a
    load that outlives its 6 hours, or a retry after them): the transaction is rolled back, a new session at the
    same snapshot is opened and the load done again, whole, once."""
    from flows.refresh_table import refresh_table
    from tasks.registry import register_table

    source, ref = on_standin
    schema = env.schema_name
    monkeypatch.setenv("BIGQUERY_STORAGE_HONOURS_OFFSETS", "true")
    monkeypatch.setenv("REFRESH_RETRIES", "0")
    data = sqp_rows(2000)
    put_table(source, "sqp", SQP_SCHEMA, data)
    standin.register(ref, data)
    register_table(pg, schema, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at", "streams": 2})
    later = sqp_rows(2000, updated=T0 + timedelta(days=1), price_bump=Decimal(5))
    standin.fail_mid_stream("expire", at_row=700, stream=1, on_hit=lambda: standin.register(ref, later))

    result = refresh_table("sqp")
    assert result["status"] == "success" and result["direct_load"] is True, result
    assert result["rows_inserted"] == 2000 and result["session_recreated"] == 1, result
    assert_same_rows(source_rows(source, "sqp"), pg_rows(pg, f'"{schema}".sqp', "1"), SQP_KEY)
    first, second = standin.sessions
    assert second.snapshot_time == first.snapshot_time and second.streams != first.streams
