"""A stand-in for BigQuery's Storage Read API, for what the emulator cannot do: a real gRPC server that the real
``google.cloud.bigquery_storage_v1.BigQueryReadClient`` talks to over a socket.

It serves Arrow tables a test registers per table (``projects/p/datasets/d/tables/t`` or ``p.d.t``), each a list of
versions in time (time travel), through ``CreateReadSession``, ``ReadRows`` (server streaming) and ``SplitReadStream``,
with the message classes of ``google.cloud.bigquery_storage_v1.types`` for the wire (the package ships no .proto
files; proto-plus messages serialize themselves). What it does follows Google's documentation, cited where it is
done; the documentation pages are:

- STORAGE = https://cloud.google.com/bigquery/docs/reference/storage ("Use the BigQuery Storage Read API to read
  table data": sessions, streams, snapshots, offsets, limitations, errors)
- RPC = https://cloud.google.com/bigquery/docs/reference/storage/rpc/google.cloud.bigquery.storage.v1 (the messages)
- TIME_TRAVEL = https://cloud.google.com/bigquery/docs/time-travel and
  https://cloud.google.com/bigquery/docs/access-historical-data (the window, the error for a snapshot before it)
- READER = google-cloud-bigquery-storage's ``google/cloud/bigquery_storage_v1/reader.py`` (what the client resumes)

Behaviours a test switches on: offsets ignored (``honour_offsets=False``, as the local emulator does), faults
mid-stream after K rows (RESOURCE_EXHAUSTED with or without RetryInfo, UNAVAILABLE, the session expiring), sessions
that expire with time (``advance``) or on demand (``expire_sessions``), refusal of logical views, and a record of
every request (``sessions``, ``reads``, ``splits``) so a test can assert e.g. that no read session was created.

The product reads through it with ``BigQuerySource(storage_endpoint=standin.target, storage_honours_offsets=True)``
(or BIGQUERY_STORAGE_ENDPOINT and BIGQUERY_STORAGE_HONOURS_OFFSETS=true); left unset, the product takes an endpoint
override for the emulator, whose every ReadRows starts at row 0, and drops rows it has already read on resumption.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import grpc
import pyarrow as pa
import sqlglot
from google.cloud.bigquery_storage_v1 import types
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

SERVICE = "google.cloud.bigquery.storage.v1.BigQueryRead"
# STORAGE, "Create a session": the expiration time "is guaranteed to be at least 6 hours from session creation time".
SESSION_LIFE = timedelta(hours=6)
# TIME_TRAVEL: "You can set the duration of the time travel window, from a minimum of two days to a maximum of seven
# days"; seven days when the dataset does not say (max_time_travel_hours 48..168).
DEFAULT_TIME_TRAVEL_HOURS = 168
# STORAGE, "Limitations": "you cannot use the Storage Read API to directly read from logical or materialized views"
# and "Reading external tables is not supported". The words BigQuery answers with (INVALID_ARGUMENT) are those users
# report, e.g. coiled/dask-bigquery#41: "non-table entities cannot be read with the storage API".
NON_TABLE = {"VIEW", "MATERIALIZED_VIEW", "EXTERNAL"}
NON_TABLE_MESSAGE = "request failed: non-table entities cannot be read with the storage API"


@dataclass
class _Version:
    at: datetime
    data: pa.Table


@dataclass
class _Table:
    project: str
    dataset: str
    table: str
    kind: str
    versions: list[_Version]
    time_travel_hours: int
    estimated_bytes: int | None = None

    @property
    def label(self) -> str:
        return f"{self.project}:{self.dataset}.{self.table}"


@dataclass
class _Stream:
    name: str
    session: str
    rows: pa.Table  # the stream's rows at the session's snapshot, selected and filtered
    index: int  # its place in the session's list (a split's children keep their parent's)


@dataclass
class _Session:
    name: str
    table: str
    expire_time: datetime
    compression: str | None
    schema: pa.Schema
    expired: bool = False


@dataclass
class Fault:
    """A failure a ReadRows call meets when its stream reaches row ``at_row`` (the stream's own row numbers).

    kind: a gRPC status code name (``RESOURCE_EXHAUSTED``, ``UNAVAILABLE``, ``INTERNAL`` ...) or ``expire`` (the
    session expires there). ``times``: how many calls it fails (-1: every one). ``stream``: the index of the stream in
    its session's list (None: any). ``retry_delay_s``: sent as a google.rpc.RetryInfo detail when set.
    """

    kind: str
    at_row: int
    times: int = 1
    stream: int | None = None
    retry_delay_s: float | None = None
    message: str = ""
    hits: int = 0
    on_hit: Callable[[], None] | None = None  # run when it fires (e.g. a new version of the table lands meanwhile)


@dataclass
class SessionRecord:
    """One CreateReadSession request as received, and what was answered."""

    table: str
    selected_fields: list[str]
    row_restriction: str
    snapshot_time: datetime | None
    max_stream_count: int
    compression: str | None
    session: str | None = None
    streams: list[str] = field(default_factory=list)
    stream_rows: list[int] = field(default_factory=list)
    error: str | None = None


@dataclass
class ReadRecord:
    """One ReadRows call: the stream, the offset asked for, where the stand-in started and what it sent."""

    stream: str
    offset: int
    started_at: int
    rows_sent: int = 0
    ended: str = "open"  # "ok" or the status code it ended with


def table_path(ref: str) -> str:
    """``p.d.t`` or ``projects/p/datasets/d/tables/t`` -> the Storage Read API's table path."""
    if ref.startswith("projects/"):
        return ref
    project, dataset, table = ref.split(".")
    return f"projects/{project}/datasets/{dataset}/tables/{table}"


def _millis(at: datetime) -> int:
    return int(at.timestamp() * 1000)


class StorageStandIn:
    """The server. Use as a context manager, or ``close()`` it; ``target`` is its ``host:port``.

    Args:
        honour_offsets: ReadRows starts at the requested offset, as BigQuery does (STORAGE, "Read from a session
            stream": "you can restart reading a stream at a particular point by supplying the row offset"); False
            restarts every ReadRows at row 0, as the local emulator does.
        rows_per_message: rows per ReadRowsResponse (BigQuery sends blocks of its own size).
    """

    def __init__(self, *, honour_offsets: bool = True, rows_per_message: int = 1000) -> None:
        self.honour_offsets = honour_offsets
        self.rows_per_message = rows_per_message
        self.clock_offset = timedelta(0)
        self.faults: list[Fault] = []
        self.create_faults: list[Fault] = []
        self.sessions: list[SessionRecord] = []
        self.reads: list[ReadRecord] = []
        self.splits: list[tuple[str, float]] = []
        self._tables: dict[str, _Table] = {}
        self._sessions: dict[str, _Session] = {}
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16),
                                   options=[("grpc.max_send_message_length", 256 * 1024 * 1024)])
        self._server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
            "CreateReadSession": grpc.unary_unary_rpc_method_handler(
                self._create_read_session, request_deserializer=types.CreateReadSessionRequest.deserialize,
                response_serializer=types.ReadSession.serialize),
            "ReadRows": grpc.unary_stream_rpc_method_handler(
                self._read_rows, request_deserializer=types.ReadRowsRequest.deserialize,
                response_serializer=types.ReadRowsResponse.serialize),
            "SplitReadStream": grpc.unary_unary_rpc_method_handler(
                self._split_read_stream, request_deserializer=types.SplitReadStreamRequest.deserialize,
                response_serializer=types.SplitReadStreamResponse.serialize),
        })])
        port = self._server.add_insecure_port("127.0.0.1:0")
        self.target = f"127.0.0.1:{port}"
        self._server.start()

    def __enter__(self) -> StorageStandIn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._server.stop(grace=None)

    # --- what a test sets up -----------------------------------------------------------------------------------

    def now(self) -> datetime:
        return datetime.now(UTC) + self.clock_offset

    def advance(self, delta: timedelta) -> None:
        """Move the stand-in's clock: sessions past their expire_time expire, snapshots age."""
        self.clock_offset += delta

    def register(self, ref: str, data: pa.Table, *, kind: str = "TABLE", at: datetime | None = None,
                 time_travel_hours: int = DEFAULT_TIME_TRAVEL_HOURS, estimated_bytes: int | None = None) -> None:
        """Add a version of a table (``kind`` TABLE, VIEW, MATERIALIZED_VIEW or EXTERNAL), current from ``at``.

        A table's first version defaults to a day ago (so that a read "as of a second ago" finds it), later ones
        to now: a session at a snapshot before ``at`` reads the version before it (TIME_TRAVEL).
        """
        path = table_path(ref)
        parts = path.split("/")
        with self._lock:
            known = self._tables.get(path)
            when = at or (self.now() if known else self.now() - timedelta(days=1))
            if known is None:
                self._tables[path] = _Table(parts[1], parts[3], parts[5], kind, [_Version(when, data)],
                                            time_travel_hours, estimated_bytes)
            else:
                known.kind = kind
                known.versions = sorted([*known.versions, _Version(when, data)], key=lambda v: v.at)
                known.estimated_bytes = estimated_bytes if estimated_bytes is not None else known.estimated_bytes

    def fail_mid_stream(self, kind: str, *, at_row: int, times: int = 1, stream: int | None = None,
                        retry_delay_s: float | None = None, message: str = "",
                        on_hit: Callable[[], None] | None = None) -> Fault:
        """A ReadRows call fails with ``kind`` once its stream reaches ``at_row`` (see Fault)."""
        fault = Fault(kind, at_row, times, stream, retry_delay_s, message, on_hit=on_hit)
        with self._lock:
            self.faults.append(fault)
        return fault

    def fail_create(self, kind: str, *, times: int = 1, retry_delay_s: float | None = None) -> Fault:
        """The next ``times`` CreateReadSession calls fail with ``kind``."""
        fault = Fault(kind, 0, times, None, retry_delay_s)
        with self._lock:
            self.create_faults.append(fault)
        return fault

    def expire_sessions(self) -> None:
        """Every session created so far expires now (the next ReadRows on it fails as an expired one does)."""
        with self._lock:
            for session in self._sessions.values():
                session.expired = True

    def rows_read(self, stream: str | None = None) -> int:
        """Rows sent by every ReadRows call (of one stream)."""
        return sum(r.rows_sent for r in self.reads if stream is None or r.stream == stream)

    # --- the service ----------------------------------------------------------------------------------------------

    def _abort(self, context: grpc.ServicerContext, code: grpc.StatusCode, message: str,
               retry_delay_s: float | None = None) -> None:
        details = []
        if retry_delay_s is not None:
            # READER: ReadRowsStream resumes a RESOURCE_EXHAUSTED only when it carries a RetryInfo detail.
            info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(
                seconds=int(retry_delay_s), nanos=int((retry_delay_s % 1) * 1e9)))
            packed = any_pb2.Any()
            packed.Pack(info)
            details.append(packed)
        context.abort_with_status(rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message,
                                                                         details=details)))

    def _create_read_session(self, request: types.CreateReadSessionRequest,
                             context: grpc.ServicerContext) -> types.ReadSession:
        asked = request.read_session
        options = asked.read_options
        snapshot = None
        if asked.table_modifiers and "snapshot_time" in asked.table_modifiers:
            snapshot = asked.table_modifiers.snapshot_time  # proto-plus gives a datetime
        compression = None
        if options.arrow_serialization_options.buffer_compression == \
                types.ArrowSerializationOptions.CompressionCodec.LZ4_FRAME:
            compression = "lz4"
        elif options.arrow_serialization_options.buffer_compression == \
                types.ArrowSerializationOptions.CompressionCodec.ZSTD:
            compression = "zstd"
        record = SessionRecord(asked.table, list(options.selected_fields), options.row_restriction, snapshot,
                               request.max_stream_count, compression)
        with self._lock:
            self.sessions.append(record)
            fault = next((f for f in self.create_faults if f.times != 0), None)
            if fault is not None:
                fault.times -= 1 if fault.times > 0 else 0
                fault.hits += 1
        if fault is not None:
            record.error = fault.kind
            self._abort(context, grpc.StatusCode[fault.kind], fault.message or "quota exceeded (stand-in)",
                        fault.retry_delay_s)
        try:
            session = self._open(request, record, snapshot)
        except _Refusal as refusal:
            record.error = f"{refusal.code.name}: {refusal.message}"
            self._abort(context, refusal.code, refusal.message)
            raise AssertionError("unreachable") from None
        return session

    def _open(self, request: types.CreateReadSessionRequest, record: SessionRecord,
              snapshot: datetime | None) -> types.ReadSession:
        asked = request.read_session
        known = self._tables.get(asked.table)
        if known is None:
            parts = asked.table.split("/")
            label = f"{parts[1]}:{parts[3]}.{parts[5]}" if len(parts) == 6 else asked.table
            # TIME_TRAVEL (access-historical-data): "Not found: Table myproject:mydataset.table was not found in location US"
            raise _Refusal(grpc.StatusCode.NOT_FOUND, f"Not found: Table {label} was not found in location US")
        if known.kind in NON_TABLE:
            raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT, NON_TABLE_MESSAGE)
        now = self.now()
        at = snapshot or now  # STORAGE: "The default snapshot time is based on the session creation time"
        earliest = max(now - timedelta(hours=known.time_travel_hours), known.versions[0].at)
        if at < earliest:
            # TIME_TRAVEL (access-historical-data): a time "prior to the time travel window or from before the table
            # was created" fails with "Invalid snapshot time ... Cannot read before ...".
            raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                           f"Invalid snapshot time {_millis(at)} for table {known.label}@{_millis(at)}."
                           f" Cannot read before {_millis(earliest)}.")
        data = [v for v in known.versions if v.at <= at][-1].data
        names = list(asked.read_options.selected_fields)
        unknown = [n for n in names if n not in data.schema.names]
        if unknown:
            raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                           f"request failed: The following selected fields do not exist in the table schema:"
                           f" {', '.join(unknown)}")
        # RPC, TableReadOptions.selected_fields: "The output field order is unrelated to the order of fields in
        # selected_fields": the table's order here.
        chosen = [n for n in data.schema.names if n in names] if names else data.schema.names
        rows = self._restrict(data, asked.read_options.row_restriction, known)
        rows = rows.select(chosen)
        estimated_bytes = known.estimated_bytes
        if estimated_bytes is None:
            # RPC, ReadSession.estimated_total_bytes_scanned: "An estimate on the number of bytes this session will
            # scan when all streams are completely consumed": the selected columns, whatever the row filter keeps.
            estimated_bytes = data.select(chosen).nbytes
        session_id = f"standin{next(self._ids)}{uuid.uuid4().hex[:8]}"
        parent = request.parent.split("/")[-1] if request.parent else known.project
        name = f"projects/{parent}/locations/us/sessions/{session_id}"
        # STORAGE, "Create a session": "the server ... creates one or more streams, each of which represents
        # approximately the same amount of table data"; a table with no rows to read gets none (the caller reads
        # every stream it is given, here none).
        count = min(max(1, request.max_stream_count or 1), rows.num_rows)
        bounds = [rows.num_rows * i // count for i in range(count + 1)] if count else [0]
        streams = []
        with self._lock:
            for i in range(count):
                stream = _Stream(f"{name}/streams/s{i}", name, rows.slice(bounds[i], bounds[i + 1] - bounds[i]), i)
                self._streams[stream.name] = stream
                streams.append(stream)
            self._sessions[name] = _Session(name, asked.table, now + SESSION_LIFE, record.compression,
                                            rows.schema)
        record.session, record.streams = name, [s.name for s in streams]
        record.stream_rows = [s.rows.num_rows for s in streams]
        expire = now + SESSION_LIFE
        return types.ReadSession(
            name=name, expire_time=expire, data_format=types.DataFormat.ARROW,
            arrow_schema=types.ArrowSchema(serialized_schema=rows.schema.serialize().to_pybytes()),
            table=asked.table, table_modifiers=asked.table_modifiers, read_options=asked.read_options,
            streams=[types.ReadStream(name=s.name) for s in streams],
            estimated_total_bytes_scanned=estimated_bytes, estimated_row_count=rows.num_rows,
        )

    def _restrict(self, data: pa.Table, restriction: str, known: _Table) -> pa.Table:
        """The rows a row restriction keeps, in their order, with their Arrow types untouched (DuckDB only says
        which rows; the restriction, BigQuery SQL, is translated by sqlglot)."""
        if not restriction:
            return data
        try:
            condition = sqlglot.parse_one(restriction, read="bigquery").sql("duckdb")
            numbered = data.append_column("__standin_row", pa.array(range(data.num_rows), pa.int64()))
            con = duckdb.connect()
            try:
                con.register("t", numbered)
                kept = con.execute(f"SELECT __standin_row FROM t WHERE {condition} ORDER BY 1").fetchall()  # noqa: S608
            finally:
                con.close()
        except (sqlglot.errors.ParseError, duckdb.Error):
            # Users report BigQuery's words for a filter it cannot apply (GoogleCloudDataproc/spark-bigquery-connector#421).
            raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"request failed: Row filter for table {known.label} is"
                                                              f" invalid. Filter is '{restriction}'") from None
        return data.take(pa.array([r[0] for r in kept], pa.int64()))

    def _expired(self, session: _Session) -> bool:
        return session.expired or self.now() >= session.expire_time

    def _read_rows(self, request: types.ReadRowsRequest, context: grpc.ServicerContext) -> Iterator[types.ReadRowsResponse]:
        with self._lock:
            stream = self._streams.get(request.read_stream)
            session = self._sessions.get(stream.session) if stream is not None else None
        if stream is None or session is None:
            self._abort(context, grpc.StatusCode.NOT_FOUND, f"Requested entity was not found: {request.read_stream}")
            return
        total = stream.rows.num_rows
        start = request.offset if self.honour_offsets else 0
        record = ReadRecord(request.read_stream, int(request.offset), start)
        with self._lock:
            self.reads.append(record)
        index = stream.index
        if start > total:
            # RPC, ReadRowsRequest.offset: "Requesting a larger offset is undefined."
            record.ended = "OUT_OF_RANGE"
            self._abort(context, grpc.StatusCode.OUT_OF_RANGE, f"offset {start} is past the stream's {total} rows")
        position = start
        while True:
            if self._expired(session):
                self._expire(context, session, stream, record)
            fault = self._fault_at(position, index)
            if fault is not None:
                record.ended = fault.kind
                if fault.on_hit is not None:
                    fault.on_hit()
                if fault.kind == "expire":
                    session.expired = True
                    self._expire(context, session, stream, record)
                self._abort(context, grpc.StatusCode[fault.kind],
                            fault.message or f"{fault.kind.lower()} at row {position} (stand-in)", fault.retry_delay_s)
            if position >= total:
                break
            end = min(total, position + self.rows_per_message)
            upcoming = [f.at_row for f in self._live_faults(index) if f.at_row > position]
            if upcoming:
                end = min(end, min(upcoming))
            batch = stream.rows.slice(position, end - position).combine_chunks()
            chunk = batch.to_batches()[0] if batch.num_rows else pa.RecordBatch.from_pylist([], batch.schema)
            yield types.ReadRowsResponse(
                arrow_record_batch=types.ArrowRecordBatch(
                    serialized_record_batch=_ipc_batch(chunk, session.compression), row_count=chunk.num_rows),
                row_count=chunk.num_rows,
                stats=types.StreamStats(progress=types.StreamStats.Progress(
                    at_response_start=position / total, at_response_end=end / total)),
            )
            record.rows_sent += chunk.num_rows
            position = end
        record.ended = "ok"

    def _expire(self, context: grpc.ServicerContext, session: _Session, stream: _Stream, record: ReadRecord) -> None:
        record.ended = "FAILED_PRECONDITION"
        # What BigQuery answers on a stream whose session expired (users' reports of it: GoogleCloudDataproc/
        # spark-bigquery-connector#1316, googleapis/google-cloud-go#10671; STORAGE, "Troubleshoot errors": "Stream
        # expired ... the 6-hour timeout").
        at = session.expire_time.isoformat(timespec="seconds")
        self._abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                    f"there was an error operating on '{stream.name}': session expired at {at}")

    def _live_faults(self, index: int) -> list[Fault]:
        return [f for f in self.faults if f.times != 0 and (f.stream is None or f.stream == index)]

    def _fault_at(self, position: int, index: int) -> Fault | None:
        with self._lock:
            for fault in self._live_faults(index):
                if fault.at_row == position:
                    fault.times -= 1 if fault.times > 0 else 0
                    fault.hits += 1
                    return fault
        return None

    def _split_read_stream(self, request: types.SplitReadStreamRequest,
                           context: grpc.ServicerContext) -> types.SplitReadStreamResponse:
        with self._lock:
            self.splits.append((request.name, request.fraction))
            stream = self._streams.get(request.name)
        if stream is None:
            self._abort(context, grpc.StatusCode.NOT_FOUND, f"Requested entity was not found: {request.name}")
            raise AssertionError("unreachable")
        total = stream.rows.num_rows
        cut = int(total * (request.fraction or 0.5))
        if total < 2 or not 0 < cut < total:
            # RPC, SplitReadStreamResponse: the streams are empty "if the original stream can not be split".
            return types.SplitReadStreamResponse()
        # RPC, SplitReadStream: "original[0-j] = primary[0-j] and original[j-n] = residual[0-m]".
        primary = _Stream(f"{stream.name}p", stream.session, stream.rows.slice(0, cut), stream.index)
        residual = _Stream(f"{stream.name}r", stream.session, stream.rows.slice(cut), stream.index)
        with self._lock:
            self._streams[primary.name] = primary
            self._streams[residual.name] = residual
        return types.SplitReadStreamResponse(primary_stream=types.ReadStream(name=primary.name),
                                             remainder_stream=types.ReadStream(name=residual.name))


class _Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _ipc_batch(batch: pa.RecordBatch, compression: str | None) -> bytes:
    """One record batch as an Arrow IPC message without its schema (the schema is in the session), its buffers
    compressed as the session asked (RPC, ArrowSerializationOptions.buffer_compression)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema, options=pa.ipc.IpcWriteOptions(compression=compression)) as writer:
        writer.write_batch(batch)
    reader = pa.ipc.MessageReader.open_stream(sink.getvalue())
    reader.read_next_message()  # the schema
    return bytes(reader.read_next_message().serialize().to_pybytes())


def read_client(target: str) -> Any:
    """The real Google client, on a plain channel to ``target`` (as the product's block builds it)."""
    from google.cloud.bigquery_storage_v1 import BigQueryReadClient
    from google.cloud.bigquery_storage_v1.services.big_query_read.transports import BigQueryReadGrpcTransport

    return BigQueryReadClient(transport=BigQueryReadGrpcTransport(channel=grpc.insecure_channel(target)))
