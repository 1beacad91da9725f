"""BigQuery's own Arrow types land exactly per the type contract (docs/architecture.md, "Type contract").

What Google documents. The Storage Read API's page (https://cloud.google.com/bigquery/docs/reference/storage,
section "Arrow schema details", which the bigrquerystorage maintainers cite for "geography are returned as utf8";
meztez/bigrquerystorage#53) was not in the stored copies this was written from; the stored copies of Google's
companion page https://cloud.google.com/bigquery/docs/supported-data-types ("Supported protocol buffer and Arrow
data types") break off where its Arrow table starts. What they do hold, quoted:

    | BigQuery data type | Supported protocol buffer types |
    | GEOGRAPHY | string  The value is a geometry in either WKT or GeoJson format. |
    | JSON      | string |
    | TIMESTAMP | int64 (preferred), int32, uint32, google.protobuf.Timestamp  The value is given in microseconds
                  since the Unix epoch (1970-01-01). |
    | INTERVAL  | string, google.protobuf.Duration  The string value must be an INTERVAL literal. |
    | RANGE<T>  | message  A nested message type in the proto with two fields, start and end, where both fields must
                  be of the same supported protocol buffer type that corresponds to a BigQuery data type T. T must
                  be one of DATE, DATETIME, or TIMESTAMP. If a field (start or end) is not set in the proto message,
                  it represents an unbounded boundary. |

and the Storage v1 field types (TableFieldSchema.Type, https://cloud.google.com/dotnet/docs/reference/
Google.Cloud.BigQuery.Storage.V1/latest/Google.Cloud.BigQuery.Storage.V1.TableFieldSchema.Types.Type):
"Timestamp | 64-bit signed usec since UTC epoch", "Time | Civil time - Hour, Minute, Second, Microseconds",
"Datetime | Combination of civil date and civil time", "Json | JSON, String", "Range | RANGE".

The Arrow form of each type, as Google's own client builds it for the same data (google-cloud-bigquery 3.47,
google/cloud/bigquery/_pyarrow_helpers.py and _pandas_helpers.py, "map as closely to the BQ Storage API as
possible") and as a real Storage Read session returned it (yoshidan/google-cloud-rust, bigquery/src/grpc/apiv1:
JSON ``Utf8`` with ``ARROW:extension:name`` ``google:sqlType:json``, on the list field for ARRAY<JSON>; ARRAY a
non-null ``List`` of ``item``; NUMERIC ``Decimal128(38, 9)``; TIMESTAMP ``Timestamp(Microsecond, "UTC")``):

    | BigQuery    | Arrow                                 | extension metadata                                  |
    | GEOGRAPHY   | string (WKT)                          | ARROW:extension:name google:sqlType:geography,      |
    |             |                                       | ARROW:extension:metadata {"encoding": "WKT"}        |
    | JSON        | string                                | ARROW:extension:name google:sqlType:json            |
    | NUMERIC     | decimal128(38, 9)                     |                                                     |
    | BIGNUMERIC  | decimal256(76, 38)                    |                                                     |
    | DATETIME    | timestamp[us] (no time zone)          | ARROW:extension:name google:sqlType:datetime        |
    | TIME        | time64[us]                            |                                                     |
    | TIMESTAMP   | timestamp[us, tz=UTC]                 |                                                     |
    | RANGE<T>    | struct<start: T, end: T>              | (none documented; google:sqlType:range accepted)    |
    | INTERVAL    | month_day_nano_interval               | (google:sqlType:interval accepted)                  |
    | STRUCT      | struct<...>                           |                                                     |
    | ARRAY<T>    | list<item: T>, not nullable           | T's, on the list field                              |

Each lands as the contract says: GEOGRAPHY text (WKT; WKB from the emulator decoded to WKT), JSON jsonb,
NUMERIC numeric(38,9), BIGNUMERIC numeric, DATETIME timestamp, TIME time, TIMESTAMP timestamptz, RANGE<DATE|
DATETIME|TIMESTAMP> daterange/tsrange/tstzrange ([start, end); a NULL bound unbounded), INTERVAL interval (months,
days and microseconds part for part), STRUCT and ARRAY<STRUCT> jsonb (NUMERIC members as their exact decimal
text, TIMESTAMP ISO 8601 with offset, BYTES base64, INTERVAL an ISO 8601 duration of its three parts), ARRAY<NUMERIC|TIMESTAMP> numeric(38,9)[] / timestamptz[].

Two ways in:

- Record batches built to that schema go through the product's whole refresh for in-process batches (plan ->
  conform -> Polars shaping -> row hashes -> ADBC COPY into staging -> checks, the checksum re-hashing stored
  values -> publish) into PostgreSQL; every stored value is read back and compared with the value written out
  here. A second night with the same batches rewrites nothing (the new types hash alike from night to night), a
  third with one changed INTERVAL rewrites that row alone.
- The emulator, where it can hold the type (GEOGRAPHY, which it serves as WKB, JSON, NUMERIC, TIME, DATETIME,
  INTERVAL, RANGE<DATE>, RANGE<TIMESTAMP>, STRUCT with NUMERIC/TIMESTAMP/BYTES, ARRAY<STRUCT>, ARRAY<NUMERIC>,
  ARRAY<TIMESTAMP>), through a whole refresh, compared with BigQuery's answer by tests/comparator.py; GEOGRAPHY,
  which the emulator's REST answer cannot give (the client fails on it), against WKT written out here.
  Negative INTERVALs only in the built batches: the emulator's REST answer for them is not BigQuery's (the
  client reads MAKE_INTERVAL(0, -1, -2, -3, 0, 0) as -1 month +2 days +3 hours; its Storage Read is right).
  The emulator cannot hold BIGNUMERIC (creating the column never answers) and marks no extension metadata
  (its JSON is a plain string, its GEOGRAPHY geoarrow.wkb): BIGNUMERIC, the documented extension metadata and
  RANGE<DATETIME> are covered by the built batches only.
"""

from __future__ import annotations

import json
import struct
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any

import psycopg
import pyarrow as pa
import pytest
from google.cloud import bigquery
from psycopg.types.string import TextLoader

from blocks import BigQuerySource, Resources
from bq_refresh.errors import SourceError
from bq_refresh.settings import Settings
from tasks import sync
from tasks.fastpath import LocalSource
from tasks.geography import wkb_to_wkt
from tasks.migrations import apply_migrations
from tasks.registry import get_entry, register_table
from tasks.transform import get_transform, shape
from tasks.typemap import Column, arrow_source_type, conform
from tests.bqdata import assert_same_rows, pg_rows, run_sql

GEO = {b"ARROW:extension:name": b"google:sqlType:geography", b"ARROW:extension:metadata": b'{"encoding": "WKT"}'}
JSON_TYPE = {b"ARROW:extension:name": b"google:sqlType:json"}
DATETIME_TYPE = {b"ARROW:extension:name": b"google:sqlType:datetime"}
RANGE_TYPE = {b"ARROW:extension:name": b"google:sqlType:range"}
INTERVAL_TYPE = {b"ARROW:extension:name": b"google:sqlType:interval"}
WKB = {b"ARROW:extension:name": b"geoarrow.wkb"}  # the emulator's GEOGRAPHY


def _range(t: pa.DataType) -> pa.DataType:
    return pa.struct([pa.field("start", t), pa.field("end", t)])


GOOGLE_SCHEMA = pa.schema([
    pa.field("id", pa.int64(), nullable=False),
    pa.field("geo", pa.string(), metadata=GEO),
    pa.field("geo_wkb", pa.binary(), metadata=WKB),
    pa.field("js", pa.string(), metadata=JSON_TYPE),
    pa.field("num", pa.decimal128(38, 9)),
    pa.field("bnum", pa.decimal256(76, 38)),
    pa.field("dt", pa.timestamp("us"), metadata=DATETIME_TYPE),
    pa.field("t", pa.time64("us")),
    pa.field("ts", pa.timestamp("us", tz="UTC")),
    pa.field("rd", _range(pa.date32()), metadata=RANGE_TYPE),
    pa.field("rdt", _range(pa.timestamp("us")), metadata=RANGE_TYPE),
    pa.field("rts", _range(pa.timestamp("us", tz="UTC")), metadata=RANGE_TYPE),
    pa.field("iv", pa.month_day_nano_interval(), metadata=INTERVAL_TYPE),
    pa.field("st", pa.struct([pa.field("n", pa.decimal128(38, 9)), pa.field("bn", pa.decimal256(76, 38)),
                              pa.field("ts", pa.timestamp("us", tz="UTC")), pa.field("b", pa.binary()),
                              pa.field("iv", pa.month_day_nano_interval())])),
    pa.field("ast", pa.list_(pa.field("item", pa.struct([pa.field("a", pa.int64()), pa.field("n", pa.decimal128(38, 9))]))),
             nullable=False),
    pa.field("anum", pa.list_(pa.field("item", pa.decimal128(38, 9))), nullable=False),
    pa.field("abnum", pa.list_(pa.field("item", pa.decimal256(76, 38))), nullable=False),
    pa.field("ats", pa.list_(pa.field("item", pa.timestamp("us", tz="UTC"))), nullable=False),
    pa.field("ajs", pa.list_(pa.field("item", pa.string())), nullable=False, metadata=JSON_TYPE),
])


def _point_wkb(x: float, y: float) -> bytes:
    return struct.pack("<BIdd", 1, 1, x, y)  # little endian, type 1 (Point)


ROWS: list[dict[str, Any]] = [
    {"id": 1, "geo": "POLYGON((0 0, 10 0, 10 10, 0 0))", "geo_wkb": _point_wkb(-122.4194, 37.7749),
     "js": '{"a":[1,2.5,"x"],"b":{"c":null}}', "num": Decimal("12345.123456789"),
     "bnum": Decimal("1.12345678901234567890123456789012345678"),
     "dt": datetime(2024, 2, 29, 12, 34, 56, 789012), "t": time(12, 34, 56, 123456),
     "ts": datetime(2024, 2, 29, 12, 34, 56, 789012, tzinfo=UTC),
     "rd": {"start": date(2024, 1, 1), "end": date(2024, 2, 1)},
     "rdt": {"start": datetime(2024, 1, 1, 8, 30), "end": datetime(2024, 1, 1, 17, 0, 0, 1)},
     "rts": {"start": datetime(2024, 1, 1, tzinfo=UTC), "end": datetime(2024, 1, 2, 0, 0, 0, 5, tzinfo=UTC)},
     "iv": pa.MonthDayNano([14, 3, 14_706_789_000_000]),
     "st": {"n": Decimal("1.5"), "bn": Decimal("-0.00000000000000000000000000000000000001"),
            "ts": datetime(2024, 1, 1, 0, 0, 0, 1, tzinfo=UTC), "b": b"\x00\xff",
            "iv": pa.MonthDayNano([-1, 0, -1_000])},
     "ast": [{"a": 1, "n": Decimal("2.25")}, {"a": 2, "n": None}],
     "anum": [Decimal("1.5"), Decimal("-0.000000001")], "ats": [datetime(2024, 1, 1, tzinfo=UTC)],
     "abnum": [Decimal("0.00000000000000000000000000000000000001")],
     "ajs": ['{"k":1}', "[true]", '"s"']},
    {"id": 2, "geo": "GEOMETRYCOLLECTION(POINT(1 2), LINESTRING(1 2, 3 4))", "geo_wkb": _point_wkb(1.0, 2.0),
     "js": '"just a string"', "num": Decimal("99999999999999999999999999999.999999999"),
     "bnum": Decimal("-99999999999999999999999999999999999999.99999999999999999999999999999999999999"),
     "dt": datetime(9999, 12, 31, 23, 59, 59, 999999), "t": time(23, 59, 59, 999999),
     "ts": datetime(1, 1, 1, tzinfo=UTC),
     "rd": {"start": date(2024, 1, 1), "end": None}, "rdt": {"start": None, "end": datetime(2024, 1, 1)},
     "rts": {"start": None, "end": None},
     "iv": pa.MonthDayNano([-1, -2, -90_000_000_000_000]),  # 25 hours stay 25 hours, not 1 day 1 hour
     "st": {"n": None, "bn": None, "ts": None, "b": None, "iv": None}, "ast": [], "anum": [], "ats": [], "abnum": [],
     "ajs": []},
    {"id": 3, **{c: None for c in ("geo", "geo_wkb", "js", "num", "bnum", "dt", "t", "ts", "rd", "rdt", "rts", "iv",
                                   "st")},
     "ast": [], "anum": [Decimal("0")], "ats": [], "abnum": [], "ajs": ["null"]},
]

# The contract's PostgreSQL type of each column, as format_type() writes it.
DECLARED = {"id": "bigint", "geo": "text", "geo_wkb": "text", "js": "jsonb", "num": "numeric(38,9)", "bnum": "numeric",
            "dt": "timestamp without time zone", "t": "time without time zone", "ts": "timestamp with time zone",
            "rd": "daterange", "rdt": "tsrange", "rts": "tstzrange", "iv": "interval", "st": "jsonb", "ast": "jsonb",
            "anum": "numeric(38,9)[]", "ats": "timestamp with time zone[]", "abnum": "numeric[]", "ajs": "jsonb"}

# What PostgreSQL holds, read back (ranges, intervals and jsonb as PostgreSQL's own text, IntervalStyle postgres),
# written out value by value.
STORED: dict[str, list[Any]] = {
    "geo": ["POLYGON((0 0, 10 0, 10 10, 0 0))", "GEOMETRYCOLLECTION(POINT(1 2), LINESTRING(1 2, 3 4))", None],
    "geo_wkb": ["POINT(-122.4194 37.7749)", "POINT(1 2)", None],
    "js": ['{"a": [1, 2.5, "x"], "b": {"c": null}}', '"just a string"', None],
    "num": [Decimal("12345.123456789"), Decimal("99999999999999999999999999999.999999999"), None],
    "bnum": [Decimal("1.12345678901234567890123456789012345678"),
             Decimal("-99999999999999999999999999999999999999.99999999999999999999999999999999999999"), None],
    "dt": [datetime(2024, 2, 29, 12, 34, 56, 789012), datetime(9999, 12, 31, 23, 59, 59, 999999), None],
    "t": [time(12, 34, 56, 123456), time(23, 59, 59, 999999), None],
    "ts": [datetime(2024, 2, 29, 12, 34, 56, 789012, tzinfo=UTC), datetime(1, 1, 1, tzinfo=UTC), None],
    "rd": ["[2024-01-01,2024-02-01)", "[2024-01-01,)", None],
    "rdt": ['["2024-01-01 08:30:00","2024-01-01 17:00:00.000001")', '(,"2024-01-01 00:00:00")', None],
    "rts": ['["2024-01-01 00:00:00+00","2024-01-02 00:00:00.000005+00")', "(,)", None],
    "iv": ["1 year 2 mons 3 days 04:05:06.789", "-1 mons -2 days -25:00:00", None],
    "st": ['{"b": "AP8=", "n": "1.500000000", "bn": "-1E-38", "iv": "P-1M0DT-0.000001S",'
           ' "ts": "2024-01-01T00:00:00.000001+00:00"}',
           '{"b": null, "n": null, "bn": null, "iv": null, "ts": null}', None],
    "ast": ['[{"a": 1, "n": "2.250000000"}, {"a": 2, "n": null}]', "[]", "[]"],
    "anum": [[Decimal("1.5"), Decimal("-0.000000001")], [], [Decimal("0")]],
    "ats": [[datetime(2024, 1, 1, tzinfo=UTC)], [], []],
    "abnum": [[Decimal("1E-38")], [], []],
    "ajs": ['[{"k": 1}, [true], "s"]', "[]", "[null]"],
}
AS_TEXT = {"js", "rd", "rdt", "rts", "iv", "st", "ast", "ajs"}


def google_batches(rows: list[dict[str, Any]]) -> LocalSource:
    table = pa.Table.from_pylist(rows, schema=GOOGLE_SCHEMA)
    return LocalSource(table.schema, {"stream-0": lambda offset: iter(table.slice(offset).to_batches(max_chunksize=2))},
                       estimated_rows=table.num_rows)


def night(res: Resources, pg: psycopg.Connection[Any], schema: str, local: LocalSource) -> sync.PublishResult:
    """One whole refresh of in-process batches, as the product runs it (bench/adoption.py drives it the same way)."""
    plan = sync.plan_refresh(res, get_entry(pg, schema, "types"), local=local)
    manifest = sync.stage_rows(res, plan, local=local)
    if manifest.published is not None:
        return manifest.published
    sync.check_staged(res, plan, audit_id=None)
    return sync.publish(res, plan)


def stored(pg: psycopg.Connection[Any], schema: str) -> dict[str, list[Any]]:
    names = ", ".join(f"{c}::text AS {c}" if c in AS_TEXT else c for c in STORED)
    with pg.cursor() as cur:
        cur.execute("SET TimeZone = 'UTC'")
        rows = cur.execute(f'SELECT {names} FROM "{schema}".types ORDER BY id').fetchall()  # noqa: S608
    return {c: [r[i] for r in rows] for i, c in enumerate(STORED)}


@pytest.mark.once
@pytest.mark.second
def test_google_arrow_fields_are_read_as_their_bigquery_types() -> None:
    assert {f.name: arrow_source_type(f) for f in GOOGLE_SCHEMA} == {
        "id": ("INT64", "REQUIRED"), "geo": ("GEOGRAPHY", "NULLABLE"), "geo_wkb": ("GEOGRAPHY", "NULLABLE"),
        "js": ("JSON", "NULLABLE"), "num": ("NUMERIC", "NULLABLE"), "bnum": ("BIGNUMERIC", "NULLABLE"),
        "dt": ("DATETIME", "NULLABLE"), "t": ("TIME", "NULLABLE"), "ts": ("TIMESTAMP", "NULLABLE"),
        "rd": ("RANGE<DATE>", "NULLABLE"), "rdt": ("RANGE<DATETIME>", "NULLABLE"),
        "rts": ("RANGE<TIMESTAMP>", "NULLABLE"), "iv": ("INTERVAL", "NULLABLE"), "st": ("RECORD", "NULLABLE"),
        "ast": ("RECORD", "REPEATED"), "anum": ("NUMERIC", "REPEATED"), "ats": ("TIMESTAMP", "REPEATED"),
        "abnum": ("BIGNUMERIC", "REPEATED"), "ajs": ("JSON", "REPEATED"),
    }
    # A struct named start/end without RANGE's marking is a STRUCT, as BigQuery's own RECORD of that shape.
    assert arrow_source_type(pa.field("s", _range(pa.date32()))) == ("RECORD", "NULLABLE")


def test_google_arrow_batches_land_exactly_per_the_type_contract(
    pg: psycopg.Connection[Any], schema: str, resources: Resources,
) -> None:
    apply_migrations(pg, schema)
    register_table(pg, schema, "types", {"source": "types", "key": ["id"], "mode": "full",
                                         "checks": {"row_count": False, "checksum": True}})  # no BigQuery to count
    first = night(resources, pg, schema, google_batches(ROWS))
    assert (first.rows_inserted, first.rows_updated, first.rows_deleted) == (3, 0, 0), first

    declared = dict(pg.execute("SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a"
                               " WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped",
                               (f'"{schema}".types',)).fetchall())
    assert declared == DECLARED
    got = stored(pg, schema)
    for column, want in STORED.items():
        for row, (g, w) in enumerate(zip(got[column], want, strict=True)):
            assert type(g) is type(w) and g == w, f"{column} row {row + 1}: stored {g!r}, the contract says {w!r}"

    again = night(resources, pg, schema, google_batches(ROWS))  # the same values hash alike: nothing rewritten
    assert (again.rows_inserted, again.rows_updated, again.rows_unchanged) == (0, 0, 3), again
    changed = [dict(r) for r in ROWS]
    changed[1]["iv"] = pa.MonthDayNano([-1, -2, -90_000_000_001_000])
    third = night(resources, pg, schema, google_batches(changed))
    assert (third.rows_inserted, third.rows_updated, third.rows_unchanged) == (0, 1, 2), third
    assert stored(pg, schema)["iv"][1] == "-1 mons -2 days -25:00:00.000001"


@pytest.mark.once
@pytest.mark.second
def test_an_interval_finer_than_the_microsecond_is_refused_naming_the_column() -> None:
    batch = pa.record_batch({"iv": pa.array([pa.MonthDayNano([0, 0, 1500])], pa.month_day_nano_interval())})
    with pytest.raises(SourceError, match=r"column 'iv': INTERVAL 0 months 0 days 1500 ns .* finer than the micro"):
        conform(batch, [Column("iv", "iv", "INTERVAL", "NULLABLE")])


@pytest.mark.once
@pytest.mark.second
def test_a_transform_keeps_bignumeric_exact_though_polars_has_no_256_bit_decimal() -> None:
    columns = [Column("id", "id", "INT64", "REQUIRED"), Column("bnum", "bnum", "BIGNUMERIC", "NULLABLE"),
               Column("s", "s", "STRING", "NULLABLE"), Column("abnum", "abnum", "BIGNUMERIC", "REPEATED")]
    big = Decimal("-99999999999999999999999999999999999999.99999999999999999999999999999999999999")
    batch = pa.record_batch({"id": pa.array([1, 2], pa.int64()), "bnum": pa.array([big, None], pa.decimal256(76, 38)),
                             "s": [" padded ", None],
                             "abnum": pa.array([[Decimal("1E-38")], []], pa.list_(pa.decimal256(76, 38)))})
    shaped = shape(batch, columns=columns, key=["id"], cursor=None, transform=get_transform("trim_strings", "t")).rows
    assert shaped.schema.field("bnum").type == pa.decimal256(76, 38)
    assert shaped.to_pydict() == {"id": [1, 2], "bnum": [big, None], "s": ["padded", None],
                                  "abnum": [[Decimal("1E-38")], []]}


# WKB written here from the OGC layout (byte order, uint32 type, then coordinates), not by the product.
def _wkb(order: str, code: int, body: bytes) -> bytes:
    return struct.pack(order + "BI", 1 if order == "<" else 0, code) + body


def _coords(order: str, *xy: float) -> bytes:
    return struct.pack(order + "d" * len(xy), *xy)


def _n(order: str, n: int) -> bytes:
    return struct.pack(order + "I", n)


WKB_CASES = [
    pytest.param(_wkb("<", 1, _coords("<", 1, 2)), "POINT(1 2)", id="point"),
    pytest.param(_wkb(">", 1, _coords(">", -0.5, 1e-7)), "POINT(-0.5 1e-07)", id="point big endian"),
    pytest.param(_wkb("<", 1, _coords("<", float("nan"), float("nan"))), "POINT EMPTY", id="empty point"),
    pytest.param(_wkb("<", 2, _n("<", 2) + _coords("<", 1, 2, 3, 4)), "LINESTRING(1 2, 3 4)", id="linestring"),
    pytest.param(_wkb("<", 3, _n("<", 2) + _n("<", 4) + _coords("<", 0, 0, 4, 0, 4, 4, 0, 0)
                      + _n("<", 4) + _coords("<", 1, 1, 2, 1, 2, 2, 1, 1)),
                 "POLYGON((0 0, 4 0, 4 4, 0 0), (1 1, 2 1, 2 2, 1 1))", id="polygon with a hole"),
    pytest.param(_wkb("<", 4, _n("<", 2) + _wkb("<", 1, _coords("<", 1, 2)) + _wkb("<", 1, _coords("<", 3, 4))),
                 "MULTIPOINT(1 2, 3 4)", id="multipoint"),
    pytest.param(_wkb("<", 5, _n("<", 1) + _wkb("<", 2, _n("<", 2) + _coords("<", 1, 2, 3, 4))),
                 "MULTILINESTRING((1 2, 3 4))", id="multilinestring"),
    pytest.param(_wkb("<", 6, _n("<", 1) + _wkb("<", 3, _n("<", 1) + _n("<", 4) + _coords("<", 0, 0, 1, 0, 1, 1, 0, 0))),
                 "MULTIPOLYGON(((0 0, 1 0, 1 1, 0 0)))", id="multipolygon"),
    pytest.param(_wkb("<", 7, _n("<", 2) + _wkb("<", 1, _coords("<", 1, 2))
                      + _wkb(">", 2, _n(">", 2) + _coords(">", 1, 2, 3, 4))),
                 "GEOMETRYCOLLECTION(POINT(1 2), LINESTRING(1 2, 3 4))", id="collection of mixed byte orders"),
    pytest.param(_wkb("<", 7, _n("<", 0)), "GEOMETRYCOLLECTION EMPTY", id="empty collection"),
    pytest.param(_wkb("<", 1001, _coords("<", 1, 2, 3)), "POINT Z(1 2 3)", id="ISO point Z"),
    pytest.param(_wkb("<", 0x20000001, _n("<", 4326) + _coords("<", 1, 2)), "POINT(1 2)", id="EWKB with SRID"),
]


@pytest.mark.once
@pytest.mark.second
@pytest.mark.parametrize(("wkb", "wkt"), WKB_CASES)
def test_wkb_is_decoded_to_wkt(wkb: bytes, wkt: str) -> None:
    assert wkb_to_wkt(wkb) == wkt


@pytest.mark.once
@pytest.mark.second
@pytest.mark.parametrize("wkb", [b"", _wkb("<", 1, _coords("<", 1)), _wkb("<", 9, b""), _wkb("<", 1, _coords("<", 1, 2)) + b"x",
                                 b"\x02" + _wkb("<", 1, _coords("<", 1, 2))[1:]],
                         ids=["empty", "short point", "unknown type", "trailing bytes", "bad byte order"])
def test_what_is_not_wkb_is_refused_naming_the_column_and_row(wkb: bytes) -> None:
    batch = pa.record_batch({"g": pa.array([_point_wkb(1, 2), wkb], pa.binary())})
    with pytest.raises(SourceError, match=r"column 'g': GEOGRAPHY value at row 1 of the batch is not WKB"):
        conform(batch, [Column("g", "g", "GEOGRAPHY", "NULLABLE")])


# ---- through the emulator -------------------------------------------------------------------------------------

S = bigquery.SchemaField
EMULATOR_SCHEMA = [
    S("id", "INT64", mode="REQUIRED"), S("geo", "GEOGRAPHY"), S("js", "JSON"), S("num", "NUMERIC"), S("t", "TIME"),
    S("dt", "DATETIME"), S("iv", "INTERVAL"), S("rd", "RANGE", range_element_type="DATE"),
    S("rts", "RANGE", range_element_type="TIMESTAMP"),
    S("st", "RECORD", fields=[S("n", "NUMERIC"), S("ts", "TIMESTAMP"), S("b", "BYTES")]),
    S("ast", "RECORD", mode="REPEATED", fields=[S("a", "INT64"), S("n", "NUMERIC")]),
    S("anum", "NUMERIC", mode="REPEATED"), S("ats", "TIMESTAMP", mode="REPEATED"),
]
EMULATOR_ROWS = [
    "(1, ST_GEOGFROMTEXT('LINESTRING(1 2, 3 4)'), JSON '{\"a\": [1, 2.5, \"x\"]}', NUMERIC '12345.123456789',"
    " TIME '12:34:56.123456', DATETIME '2024-02-29 12:34:56.789012', MAKE_INTERVAL(1, 2, 3, 4, 5, 6),"
    " RANGE(DATE '2024-01-01', DATE '2024-02-01'),"
    " RANGE(TIMESTAMP '2024-01-01 00:00:00+00', TIMESTAMP '2024-01-02 00:00:00.000005+00'),"
    " STRUCT(NUMERIC '1.5' AS n, TIMESTAMP '2024-01-01 00:00:00.000001+00' AS ts, FROM_HEX('00ff') AS b),"
    " [STRUCT(1 AS a, NUMERIC '2.25' AS n)], [NUMERIC '1.5', NUMERIC '-0.000000001'],"
    " [TIMESTAMP '2024-01-01 00:00:00+00'])",
    "(2, ST_GEOGFROMTEXT('POINT(-122.4194 37.7749)'), JSON '\"s\"', NUMERIC '-0.000000001', TIME '23:59:59.999999',"
    " DATETIME '9999-12-31 23:59:59.999999', MAKE_INTERVAL(0, 1, 2, 3, 0, 0), RANGE(DATE '2024-01-01', NULL),"
    " RANGE(NULL, TIMESTAMP '2024-01-01 00:00:00+00'), STRUCT(NULL AS n, NULL AS ts, NULL AS b), [], [], [])",
    "(3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, [], [], [])",
]
EMULATOR_WKT = {1: "LINESTRING(1 2, 3 4)", 2: "POINT(-122.4194 37.7749)", 3: None}


def test_the_emulators_types_land_per_the_contract_through_a_whole_refresh(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource,
) -> None:
    from flows.refresh_table import refresh_table

    client = source.get_bigquery_client()
    client.create_table(bigquery.Table(source.table_ref("types"), schema=EMULATOR_SCHEMA))
    run_sql(source, f"INSERT INTO `{source.table_ref('types')}` VALUES {', '.join(EMULATOR_ROWS)}")
    register_table(pg, registry, "types", {"source": "types", "key": ["id"], "mode": "full"})
    run = refresh_table("types")
    assert (run["status"], run["rows_inserted"]) == ("success", 3), run

    columns = ", ".join(f.name for f in EMULATOR_SCHEMA if f.name != "geo")
    expected = [dict(r.items()) for r in client.query(f"SELECT {columns} FROM `{source.table_ref('types')}`").result()]
    # psycopg reads interval as a timedelta, which has no months: read it as PostgreSQL's ISO 8601 text instead.
    pg.execute("SET IntervalStyle = 'iso_8601'")
    pg.adapters.register_loader("interval", TextLoader)
    try:
        actual = pg_rows(pg, f'"{registry}".types', "id")
    finally:
        pg.execute("RESET IntervalStyle")
    assert_same_rows(expected, [{k: v for k, v in r.items() if k != "geo"} for r in actual], ["id"])
    assert {r["id"]: r["geo"] for r in actual} == EMULATOR_WKT  # the emulator's WKB, stored as WKT
    assert json.loads(json.dumps(actual[0]["st"])) == {"n": "1.500000000", "ts": "2024-01-01T00:00:00.000001+00:00",
                                                       "b": "AP8="}
    assert actual[0]["iv"] == "P1Y2M3DT4H5M6S" and actual[1]["iv"] == "P1M2DT3H"
    pg.execute("SET TimeZone = 'UTC'")
    assert pg.execute(f'SELECT rd::text, rts::text FROM "{registry}".types ORDER BY id').fetchall() == [
        ("[2024-01-01,2024-02-01)", '["2024-01-01 00:00:00+00","2024-01-02 00:00:00.000005+00")'),
        ("[2024-01-01,)", '(,"2024-01-01 00:00:00+00")'), (None, None)]
