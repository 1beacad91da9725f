"""BigQuery Storage Read extraction as Arrow batches: sessions at one snapshot, streams with offsets."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pyarrow as pa
from google.api_core import exceptions as gexc
from google.api_core.retry import Retry
from google.cloud import bigquery
from google.cloud.bigquery_storage_v1 import BigQueryReadClient, types
from google.protobuf import timestamp_pb2

from blocks.bigquery import BigQuerySource
from bq_refresh.errors import SourceError, SourceUnavailable
from tasks.typemap import normalize_type

SESSION_GONE = (gexc.NotFound, gexc.FailedPrecondition, gexc.InvalidArgument, gexc.PermissionDenied)
TRANSIENT = (gexc.ServerError, gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.TooManyRequests, gexc.RetryError)


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

    @property
    def read_path(self) -> str:
        project, dataset, table = self.ref.split(".")
        return f"projects/{project}/datasets/{dataset}/tables/{table}"

    def field(self, name: str) -> SourceField | None:
        return next((f for f in self.fields if f.name == name), None)


def _fields(schema: list[bigquery.SchemaField]) -> list[SourceField]:
    return [SourceField(f.name, normalize_type(f.field_type), f.mode or "NULLABLE") for f in schema]


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


def bq_literal(value: Any, bq_type: str) -> str:
    """A typed BigQuery literal for a watermark value (never user text: values we stored)."""
    if bq_type in {"INT64", "INTEGER"}:
        return str(int(value))
    text = value.isoformat() if isinstance(value, datetime | date) else str(value)
    text = text.replace("'", "")
    return f"{bq_type} '{text}'"


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
    """Open a Storage Read session at ``snapshot_time`` (Arrow, LZ4 where the server offers it)."""
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
    """Cancels a ReadRows stream that receives nothing for ``seconds`` (time spent by our consumer between
    messages does not count). The Google client resumes a stream broken by the network without end; this
    bounds it by our own deadline."""

    def __init__(self, rows: Any, seconds: float | None) -> None:
        self.rows, self.seconds = rows, seconds
        self.fired = threading.Event()
        self.timer: threading.Timer | None = None

    def _fire(self) -> None:
        self.fired.set()
        self.rows.cancel()

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
    """Yield (batch, offset after it) from ``stream`` starting at row ``offset``.

    BigQuery starts the stream at ``offset`` itself; a server that ignores the offset (the local
    emulator does) is handled with ``server_offsets=False``: the rows before it are dropped here.

    Args:
        stall_timeout_s: give up when no message arrives for this long (the client's own reconnects
            included); None waits without end.

    Raises:
        SessionExpired: the session is gone; the caller re-creates it.
        SourceUnavailable: the server failed mid-read, or sent nothing for ``stall_timeout_s``.
    """
    skip = 0 if server_offsets else offset
    watchdog = _Watchdog(None, stall_timeout_s)
    try:
        # Each (re)connection's retry is bounded too: the client fetches a connection's first message inside
        # its retry, whose default deadline is a day.
        kwargs: dict[str, Any] = {"retry": short_retry(stall_timeout_s)} if stall_timeout_s else {}
        watchdog.rows = rows = client.read_rows(stream, offset=offset, **kwargs)
        watchdog.arm()
        for response in rows:
            watchdog.disarm()
            if response.arrow_record_batch.serialized_record_batch:
                batch = pa.ipc.read_record_batch(
                    pa.py_buffer(response.arrow_record_batch.serialized_record_batch), arrow_schema
                )
                if skip:
                    dropped = min(skip, batch.num_rows)
                    batch, skip = batch.slice(dropped), skip - dropped
                if batch.num_rows:
                    offset += batch.num_rows
                    yield batch, offset
            watchdog.arm()
    except SESSION_GONE as exc:
        raise SessionExpired(f"read session gone: {type(exc).__name__}", table=table_name) from None
    except TRANSIENT as exc:
        raise SourceUnavailable(f"BigQuery Storage Read API failed mid-read: {_describe(exc)}",
                                table=table_name) from None
    except Exception:
        if not watchdog.fired.is_set():
            raise
    finally:
        watchdog.disarm()
    if watchdog.fired.is_set():
        raise SourceUnavailable(f"BigQuery Storage Read stream sent nothing for {stall_timeout_s:g} s at row {offset}"
                                " (the connection kept breaking; BIGQUERY_TIMEOUT_SECONDS); the next attempt resumes"
                                " from the checkpoint", table=table_name)


class SessionExpired(SourceUnavailable):
    """The read session expired or vanished; a new one at the same snapshot continues the read."""
