"""BigQuery Storage Read extraction as Arrow batches: sessions at one snapshot, streams with offsets."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import grpc
import pyarrow as pa
from google.api_core import exceptions as gexc
from google.api_core import gapic_v1
from google.api_core.retry import Retry
from google.cloud import bigquery
from google.cloud.bigquery_storage_v1 import BigQueryReadClient, types
from google.protobuf import timestamp_pb2

from blocks.bigquery import BigQuerySource
from bq_refresh.errors import SourceError, SourceUnavailable
from tasks.partitions import restrict
from tasks.typemap import source_type

SESSION_GONE = (gexc.NotFound, gexc.FailedPrecondition, gexc.InvalidArgument, gexc.PermissionDenied)
TRANSIENT = (gexc.ServerError, gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.TooManyRequests, gexc.RetryError)
# What a ReadRows call resumes from, at the next row wanted: server errors (UNAVAILABLE, INTERNAL, UNKNOWN: google-cloud-
# bigquery-storage's reader.py resumes these; "Stream removed": retry, https://cloud.google.com/bigquery/docs/reference/
# storage#troubleshoot) and RESOURCE_EXHAUSTED / 429 (a quota: after its RetryInfo delay, or a backoff).
RESUMABLE = (gexc.ServerError, gexc.TooManyRequests)
RESUME_BACKOFF_S = (0.5, 5.0)  # the first and the longest pause between attempts (a RetryInfo's delay wins)
# A dataset's time travel window when it does not say: "from a minimum of two days to a maximum of seven days", seven
# by default (https://cloud.google.com/bigquery/docs/time-travel; the dataset's max_time_travel_hours, 48 to 168).
DEFAULT_TIME_TRAVEL_HOURS = 168
MIN_TIME_TRAVEL_HOURS = 48
# A resumed read must end, and its counts at the snapshot be taken, before the snapshot leaves the window.
TIME_TRAVEL_MARGIN = timedelta(hours=1)
log = logging.getLogger(__name__)


def short_retry(timeout_s: float) -> Retry:
    """The Google clients retry 5xx for 10 minutes by default; bound it by our own deadline."""
    return Retry(timeout=timeout_s, initial=0.5, maximum=5.0)


@dataclass(frozen=True)
class SourceField:
    name: str
    type: str
    mode: str


@dataclass
class SourceTable:
    """A resolved source: the table that is read, its schema, and the job that made it (query sources)."""

    ref: str  # project.dataset.table
    fields: list[SourceField]
    job_id: str | None = None
    num_rows: int = 0  # the table's metadata (0: not known), for the disk a full or initial load needs
    num_bytes: int = 0
    kind: str = "table"  # table, snapshot, external (BigLake); or view, materialized_view, external, query: read
    # through a query job's result table (tasks/sources.py)
    job_result: bool = False  # a query's result table: it never changes, read without time travel
    location: str | None = None
    bytes_processed: int = 0  # the query job's figures (query and view sources)
    bytes_billed: int = 0
    bytes_estimated: int = 0  # its dry run's estimate (with a budget, or in a dry run)
    read_at: datetime | None = None  # a query's result: when its job started (what the data reflects)
    partition_filter: str = ""  # what every read session of it carries: require_partition_filter (tasks/partitions.py)
    reused: bool = False  # the result of an earlier run's job, read again (no query run now)

    @property
    def read_path(self) -> str:
        project, dataset, table = self.ref.split(".")
        return f"projects/{project}/datasets/{dataset}/tables/{table}"

    def field(self, name: str) -> SourceField | None:
        return next((f for f in self.fields if f.name == name), None)


def _fields(schema: list[bigquery.SchemaField]) -> list[SourceField]:
    return [SourceField(f.name, source_type(f.field_type, f.range_element_type), f.mode or "NULLABLE") for f in schema]


def _describe(exc: BaseException) -> str:
    """'RetryError' alone says little: name the last error the retries saw, and the deadline."""
    if isinstance(exc, gexc.RetryError) and exc.cause is not None:
        return f"gave up retrying ({_first_line(exc)}); last error: {type(exc.cause).__name__}: {_first_line(exc.cause)}"
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    return str(exc.args[0] if exc.args else exc).splitlines()[0][:300]


def bq_ident(name: str) -> str:
    """Quote a column name for BigQuery standard SQL."""
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def parse_watermark(text: str | None, bq_type: str) -> Any:
    """Turn a stored watermark string back into a value of the cursor's type."""
    if text is None:
        return None
    if bq_type in {"INT64", "INTEGER"}:
        return int(text)
    if bq_type == "DATE":
        return date.fromisoformat(text[:10])
    parsed = datetime.fromisoformat(text)
    if bq_type == "TIMESTAMP" and parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def cursor_limit(bq_type: str, snapshot: datetime, source_timezone: str, tolerance: timedelta) -> Any:
    """The latest cursor value a read at ``snapshot`` can hold without being future-dated (None: INT64
    cursors have no clock). DATE and DATETIME cursors are wall-clock values of ``source_timezone``."""
    from zoneinfo import ZoneInfo

    if bq_type in {"INT64", "INTEGER"}:
        return None
    if bq_type == "TIMESTAMP":
        return snapshot + tolerance
    local = (snapshot + tolerance).astimezone(ZoneInfo(source_timezone))
    return local.date() if bq_type == "DATE" else local.replace(tzinfo=None)


def cap_watermark(value: str, bq_type: str, snapshot: datetime, source_timezone: str) -> str:
    """A watermark moves at most to the read snapshot: min(max cursor read, snapshot), in the cursor's type."""
    limit = cursor_limit(bq_type, snapshot, source_timezone, timedelta(0))
    if limit is None or parse_watermark(value, bq_type) <= limit:
        return value
    return str(limit.isoformat())


def watermark_floor(watermark: Any, bq_type: str, lookback: tuple[int, str]) -> Any:
    """The watermark moved back by the lookback, in the cursor's own type."""
    amount, unit = lookback
    if watermark is None or amount == 0:
        return watermark
    if bq_type in {"INT64", "INTEGER"}:
        return watermark - amount
    seconds = amount * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit or "s"]
    if bq_type == "DATE":
        return watermark - timedelta(days=max(1, seconds // 86400))
    return watermark - timedelta(seconds=seconds)


@dataclass
class ReadSessionInfo:
    """A read session's identity, kept in the checkpoint so a rerun can continue it."""

    name: str
    streams: list[str]
    arrow_schema: bytes
    snapshot_time: str
    row_restriction: str
    selected_fields: list[str]
    offsets: dict[str, int] = field(default_factory=dict)
    estimated_rows: int = 0
    estimated_bytes: int = 0  # what the session scans (selected columns, restriction applied); not checkpointed


def create_session(
    source: BigQuerySource,
    table: SourceTable,
    *,
    selected_fields: list[str],
    row_restriction: str,
    snapshot_time: datetime,
    max_streams: int,
    table_name: str,
) -> ReadSessionInfo:
    """Open a Storage Read session at ``snapshot_time`` (Arrow, LZ4 where the server offers it); on a table that
    requires a partition filter, ``row_restriction`` carries its predicate too (tasks/partitions.py)."""
    row_restriction = restrict(row_restriction, table.partition_filter)
    client = source.get_read_client()
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(snapshot_time.astimezone(UTC).replace(tzinfo=None))
    project = table.ref.split(".")[0]
    read_options = types.ReadSession.TableReadOptions(
        selected_fields=selected_fields,
        row_restriction=row_restriction,
        arrow_serialization_options=types.ArrowSerializationOptions(
            buffer_compression=types.ArrowSerializationOptions.CompressionCodec.LZ4_FRAME
        ),
    )
    request = types.ReadSession(
        table=table.read_path,
        data_format=types.DataFormat.ARROW,
        read_options=read_options,
        # A query's result table never changes, and did not exist at a snapshot taken before its job ended.
        table_modifiers=None if table.job_result else types.ReadSession.TableModifiers(snapshot_time=ts),
    )
    try:
        session = client.create_read_session(
            parent=f"projects/{project}", read_session=request, max_stream_count=max_streams,
            retry=short_retry(source.timeout_s), timeout=source.timeout_s,
        )
    except gexc.BadRequest as exc:
        if "non-table entities" in str(exc.message):
            # https://cloud.google.com/bigquery/docs/reference/storage#limitations: "you cannot use the Storage Read
            # API to directly read from logical or materialized views"; nor external tables.
            raise SourceError(f"{table.ref} is not a table (a logical or materialized view, or an external table):"
                              " BigQuery's Storage Read API reads tables only; register it as a query source (a"
                              f" --query that selects from it) [{exc.message}]", table=table_name) from None
        if "Invalid snapshot time" in str(exc.message):
            # https://cloud.google.com/bigquery/docs/access-historical-data: a time before the time travel window.
            raise SourceError(f"BigQuery can no longer read {table.ref} as of {snapshot_time.isoformat()}: the"
                              " snapshot is outside the dataset's time travel window (max_time_travel_hours)"
                              f" [{exc.message}]", table=table_name) from None
        raise SourceError(f"read session refused: {exc.message}", table=table_name) from None
    except gexc.NotFound:
        raise SourceError(f"source table {table.ref} not found", table=table_name) from None
    except gexc.Forbidden as exc:
        raise SourceError(f"permission denied reading {table.ref}: {exc.message}", table=table_name) from None
    except gexc.Unauthorized as exc:
        raise SourceError(f"BigQuery rejected the credentials: {exc.message}", table=table_name) from None
    except TRANSIENT as exc:
        raise SourceUnavailable(f"BigQuery Storage Read API unavailable: {_describe(exc)}", table=table_name) from None
    streams = [s.name for s in session.streams]
    return ReadSessionInfo(
        name=session.name,
        streams=streams,
        arrow_schema=bytes(session.arrow_schema.serialized_schema),
        snapshot_time=snapshot_time.isoformat(),
        row_restriction=row_restriction,
        selected_fields=selected_fields,
        offsets={s: 0 for s in streams},
        estimated_rows=int(getattr(session, "estimated_row_count", 0) or 0),
        estimated_bytes=int(getattr(session, "estimated_total_bytes_scanned", 0) or 0),
    )


class _Watchdog:
    """Cancels a ReadRows call that receives nothing for ``seconds`` (time spent by our consumer between
    messages does not count): a connection that hangs without an error is ended by our own deadline."""

    def __init__(self, call: Any, seconds: float | None) -> None:
        self.call, self.seconds = call, seconds
        self.fired = threading.Event()
        self.timer: threading.Timer | None = None

    def _fire(self) -> None:
        self.fired.set()
        self.call.cancel()

    def arm(self) -> None:
        self.disarm()
        if self.seconds:
            self.timer = threading.Timer(self.seconds, self._fire)
            self.timer.daemon = True
            self.timer.start()

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def _open_rows(client: BigQueryReadClient, stream: str, offset: int) -> Any:
    """One ReadRows call, without the Google client's own resumption (ReadRowsStream resumes at its own count of
    rows, which a server that ignores offsets answers from row 0: rows read twice) nor its retry (a day's deadline):
    ``read_stream`` resumes, at offsets it knows how the server honours, under the read's deadline."""
    request = types.ReadRowsRequest(read_stream=stream, offset=offset)
    # The routing header the generated client adds (BigQuery routes the call to the stream's session by it).
    routing = gapic_v1.routing_header.to_grpc_metadata((("read_stream", stream),))
    call: Any = client.transport.read_rows  # the generated stub, typed without its gRPC keywords
    return call(request, metadata=[routing])


def _retry_delay(exc: gexc.GoogleAPICallError, attempt: int) -> float:
    """The pause before the next attempt: the server's RetryInfo when it sends one (RESOURCE_EXHAUSTED does), else
    exponential with jitter."""
    for detail in getattr(exc, "details", None) or []:
        delay = getattr(detail, "retry_delay", None)
        if delay is not None and (delay.seconds or delay.nanos):
            return float(delay.seconds) + float(delay.nanos) / 1e9
    first, longest = RESUME_BACKOFF_S
    return float(min(longest, first * 2**attempt) * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not secrecy


def read_stream(
    client: BigQueryReadClient,
    stream: str,
    offset: int,
    arrow_schema: pa.Schema,
    *,
    table_name: str,
    server_offsets: bool = True,
    stall_timeout_s: float | None = None,
) -> Iterator[tuple[pa.RecordBatch, int]]:
    """Yield (batch, offset after it) from ``stream`` starting at row ``offset``, each row once.

    BigQuery starts a ReadRows call at the offset asked for ("you can restart reading a stream at a particular point
    by supplying the row offset", https://cloud.google.com/bigquery/docs/reference/storage); a server that ignores
    it (the local emulator) starts every call at row 0: ``server_offsets=False``, and the rows before the one wanted
    are dropped here, on the first call and on every resumption. A call that fails mid-stream with a transient error
    (UNAVAILABLE, RESOURCE_EXHAUSTED / 429, INTERNAL, ...) is resumed at the next row wanted after a backoff (the
    server's RetryInfo delay when it sends one).

    Args:
        server_offsets: the server starts ReadRows at the requested offset (``BigQuerySource.honours_read_offset``).
        stall_timeout_s: give up when no new row arrives for this long (resumptions included) or a call sends
            nothing for this long; None waits without end.

    Raises:
        SessionExpired: the session is gone (expired after its 6 hours, or unknown); the caller re-creates it.
        SourceUnavailable: the server kept failing, or sent nothing, for ``stall_timeout_s``.
    """
    position = offset  # the next row of the stream this read yields
    progress_at = time.monotonic()  # when ``position`` last moved (or the read started)
    attempt = 0
    while True:
        served = position if server_offsets else 0  # the stream row the server sends next on this call
        call = _open_rows(client, stream, position)
        watchdog = _Watchdog(call, stall_timeout_s)
        try:
            watchdog.arm()
            for response in call:
                watchdog.disarm()
                if response.arrow_record_batch.serialized_record_batch:
                    batch = pa.ipc.read_record_batch(
                        pa.py_buffer(response.arrow_record_batch.serialized_record_batch), arrow_schema
                    )
                    drop = min(max(position - served, 0), batch.num_rows)
                    served += batch.num_rows
                    if drop < batch.num_rows:
                        batch = batch.slice(drop)
                        position += batch.num_rows
                        progress_at, attempt = time.monotonic(), 0
                        yield batch, position
                        progress_at = time.monotonic()  # the consumer's own time (a slow flush) is not a stall
                watchdog.arm()
            return
        except grpc.RpcError as rpc_error:
            if watchdog.fired.is_set():
                raise SourceUnavailable(
                    f"BigQuery Storage Read stream sent nothing for {stall_timeout_s:g} s at row {position}"
                    " (BIGQUERY_TIMEOUT_SECONDS); the next attempt resumes from the checkpoint", table=table_name,
                ) from None
            exc = gexc.from_grpc_error(rpc_error)
            if isinstance(exc, SESSION_GONE):
                raise SessionExpired(f"read session gone: {type(exc).__name__}: {_first_line(exc)}",
                                     table=table_name) from None
            if not isinstance(exc, RESUMABLE) or isinstance(exc, gexc.MethodNotImplemented):
                raise exc from None
            delay = _retry_delay(exc, attempt)
            waited = time.monotonic() - progress_at
            if stall_timeout_s is not None and waited + delay > stall_timeout_s:
                raise SourceUnavailable(
                    f"BigQuery Storage Read API failed mid-read: gave up retrying (no new row for {waited:.1f} s,"
                    f" {attempt + 1} attempt(s), BIGQUERY_TIMEOUT_SECONDS={stall_timeout_s:g}) at row {position};"
                    f" last error: {type(exc).__name__}: {_first_line(exc)}", table=table_name) from None
            attempt += 1
            log.warning("%s: ReadRows on %s failed at row %d (%s: %s); resuming in %.2f s", table_name, stream,
                        position, type(exc).__name__, _first_line(exc), delay)
            time.sleep(delay)
        finally:
            watchdog.disarm()
            call.cancel()  # a consumer that stops early (or an error) leaves no call open on the channel


class SessionExpired(SourceUnavailable):
    """The read session expired or vanished; a new one at the same snapshot continues the read."""


def time_travel_hours(source: BigQuerySource, table_ref: str) -> int:
    """The time travel window of the dataset holding ``table_ref``, hours (its ``max_time_travel_hours``)."""
    project, dataset, _ = table_ref.split(".")
    client = source.get_bigquery_client()
    found = client.get_dataset(f"{project}.{dataset}", retry=short_retry(source.timeout_s), timeout=source.timeout_s)
    hours = found.max_time_travel_hours  # the REST resource's maxTimeTravelHours, a string; absent: the default
    return int(hours) if hours else DEFAULT_TIME_TRAVEL_HOURS


def snapshot_out_of_reach(snapshot: datetime, now: datetime, window_hours: int) -> str | None:
    """Why a read at ``snapshot`` can no longer be continued at ``now`` (BigQuery reads a table as of a time inside
    its dataset's time travel window only, https://cloud.google.com/bigquery/docs/time-travel), or None."""
    age = now - snapshot
    if age <= timedelta(hours=window_hours) - TIME_TRAVEL_MARGIN:
        return None
    return (f"its read snapshot {snapshot.isoformat()} is {age.total_seconds() / 3600:.0f} h old, past what BigQuery"
            f" can still serve (the dataset's time travel window is {window_hours} h, max_time_travel_hours, less"
            f" {TIME_TRAVEL_MARGIN.total_seconds() / 3600:g} h to finish the read): the table is read afresh")
