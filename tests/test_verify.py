"""Verify: the copy compared with BigQuery slice by slice, counts and digests computed on each side.

The canonical texts are pinned here from values written out by hand (and, where Google's reference pages give
one, their documented results: UNIX_MICROS(TIMESTAMP "2008-12-25 15:30:00+00") = 1230219000000000 on
cloud.google.com/bigquery/docs/reference/standard-sql/timestamp_functions; TO_HEX(b"foobar") = "666f6f626172" on
.../string_functions; MD5("Hello World") = "sQqNsWTgdUEFt6mb5y4/5Q==" in base64 on .../hash_functions): both
engines must produce exactly these strings, so the emulator agreeing with PostgreSQL is not the only proof.
Then `bq-refresh verify` through its real entry point: equal after a run; after hand edits in PostgreSQL (an
update, a delete, an insert) exactly the slices touched differ, and an edit that leaves the value equal (and a
float's edit, compared weaker) is not reported; a table without a window column is cut into key buckets.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any

import psycopg
import pyarrow as pa
import pytest
from psycopg import sql

from blocks import BigQuerySource
from bq_refresh.settings import Settings
from flows.refresh_table import refresh_table
from tasks import digest
from tasks.registry import register_table
from tests.bqdata import SHORT, assert_same_rows, bq_schema, pg_rows, put_table, source_rows
from tests.conftest import ROOT
from tests.test_engine import SQP_KEY, SQP_SCHEMA, sqp_rows

pytestmark = [pytest.mark.emulator, pytest.mark.usefixtures("prefect_harness")]

EDGE_SCHEMA = bq_schema([("id", "INT64", "REQUIRED"), ("n", "NUMERIC"), ("s", "STRING"), ("b", "BYTES"), ("f", "BOOL"),
                         ("d", "DATE"), ("ts", "TIMESTAMP"), ("dt", "DATETIME"), ("tm", "TIME"), ("x", "FLOAT64")])
EDGES: list[dict[str, Any]] = [
    {"id": 1, "n": Decimal("-99999999999999999999999999999.999999999"), "s": "héllo 🙂|n", "b": b"\x00\xff",
     "f": True, "d": date(1, 1, 1), "ts": datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=UTC),
     "dt": datetime(2008, 12, 25, 15, 30, 0, 1), "tm": time(15, 30, 0, 1), "x": 0.1},
    {"id": 2, "n": None, "s": None, "b": None, "f": None, "d": None, "ts": None, "dt": None, "tm": None, "x": None},
    {"id": 3, "n": Decimal("5.000000000"), "s": "", "b": b"foobar", "f": False, "d": date(9999, 12, 31),
     "ts": datetime(2008, 12, 25, 15, 30, tzinfo=UTC), "dt": datetime(1970, 1, 1), "tm": time(0, 0), "x": -0.0},
]
# Each value's canonical text, written out by hand (not computed by the product).
GOLDEN = {
    1: ["1", "-99999999999999999999999999999.999999999", "héllo 🙂|n", "00ff", "true", "0001-01-01", "-500000",
        "1230219000000001", "55800000001"],
    2: ["2", None, None, None, None, None, None, None, None],
    3: ["3", "5", "", "666f6f626172", "false", "9999-12-31", "1230219000000000", "0", "0"],
}


def edge_table() -> pa.Table:
    types = {"id": pa.int64(), "n": pa.decimal128(38, 9), "s": pa.string(), "b": pa.binary(), "f": pa.bool_(),
             "d": pa.date32(), "ts": pa.timestamp("us", tz="UTC"), "dt": pa.timestamp("us"), "tm": pa.time64("us"),
             "x": pa.float64()}
    return pa.table({k: pa.array([r[k] for r in EDGES], t) for k, t in types.items()})


def test_documented_values_of_the_bigquery_functions_the_digest_uses(source: BigQuerySource) -> None:
    client = source.get_bigquery_client()
    row = next(iter(client.query("SELECT UNIX_MICROS(TIMESTAMP '2008-12-25 15:30:00+00'), TO_HEX(b'foobar'),"
                                 " TO_BASE64(MD5('Hello World'))", retry=SHORT, job_retry=None).result(retry=SHORT)))
    assert tuple(row) == (1230219000000000, "666f6f626172", "sQqNsWTgdUEFt6mb5y4/5Q==")
    assert base64.b64encode(hashlib.md5(b"Hello World").digest()).decode() == "sQqNsWTgdUEFt6mb5y4/5Q=="  # noqa: S324


def test_both_engines_write_the_same_canonical_text_for_every_type_edge(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource,
) -> None:
    put_table(source, "edges", EDGE_SCHEMA, edge_table())
    register_table(pg, registry, "edges", {"source": "edges", "key": ["id"], "mode": "full"})
    assert refresh_table("edges")["status"] == "success"
    columns = [digest.DigestColumn(f.name, f.name, f.field_type) for f in EDGE_SCHEMA]
    exact = [c for c in columns if c.exact]
    assert [c.source_name for c in columns if not c.exact] == ["x"]  # FLOAT64: counted, not hashed
    # A STRING (the third column) carries its length; the other texts cannot hold the separator.
    expected = {i: "|".join("n" if v is None else f"{len(v)}:{v}" if at == 2 else v for at, v in enumerate(values))
                for i, values in GOLDEN.items()}

    client = source.get_bigquery_client()
    bq = {int(r[0]): r[1] for r in client.query(
        f"SELECT id, {digest.bq_row_text(exact)} FROM `{source.table_ref('edges')}`", retry=SHORT, job_retry=None,
    ).result(retry=SHORT)}
    here = {int(r[0]): r[1] for r in pg.execute(sql.SQL("SELECT t.id, {} FROM {} t").format(
        digest.pg_row_text(exact, "t"), sql.Identifier(registry, "edges"))).fetchall()}
    assert bq == expected
    assert here == expected
    # ... and the slices' sums are the MD5 halves of those texts, summed (computed here with hashlib).
    h1 = sum(int(hashlib.md5(t.encode()).hexdigest()[:8], 16) for t in expected.values())  # noqa: S324
    h2 = sum(int(hashlib.md5(t.encode()).hexdigest()[8:16], 16) for t in expected.values())  # noqa: S324
    slicing = digest.Slicing(None, [columns[0]])
    one = digest.Slicing(columns[0], [columns[0]])  # one slice per id
    for side in (
        digest.slice_digests(list(client.query(digest.bq_query(f"`{source.table_ref('edges')}`", columns, one),
                                               retry=SHORT, job_retry=None).result(retry=SHORT))),
        digest.slice_digests(pg.execute(digest.pg_query(sql.Identifier(registry, "edges"), columns, one)).fetchall()),
    ):
        assert sum(d.h1 for d in side.values()) == h1 and sum(d.h2 for d in side.values()) == h2
        assert {s: (d.rows, d.nonnull) for s, d in side.items()} == {"1": (1, (1,)), "2": (1, (0,)), "3": (1, (1,))}
    buckets = digest.slice_digests(pg.execute(digest.pg_query(sql.Identifier(registry, "edges"), columns, slicing)).fetchall())
    assert set(buckets) == {hashlib.md5(str(i).encode()).hexdigest()[:2] for i in (1, 2, 3)}  # noqa: S324


def verify(*args: str) -> tuple[int, dict[str, Any]]:
    done = subprocess.run([sys.executable, "-m", "flows.cli", "verify", "--json", *args], cwd=ROOT,
                          env={**os.environ, "COLUMNS": "80"}, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip(), done.stderr
    return done.returncode, json.loads(done.stdout)


def test_verify_finds_exactly_the_slices_edited_by_hand(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource,
) -> None:
    s = registry
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(1200, weeks=4))  # 300 rows a week: bisected below the slice
    register_table(pg, s, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at", "mode": "window",
                                  "window_column": "start_date"})
    put_table(source, "plain", SQP_SCHEMA, sqp_rows(300))
    register_table(pg, s, "plain", {"source": "plain", "key": SQP_KEY, "mode": "full"})
    assert refresh_table("sqp")["status"] == "success" and refresh_table("plain")["status"] == "success"

    code, out = verify()
    assert code == 0, out
    by = {t["table"]: t for t in out["tables"]}
    assert by[f"{s}.sqp"]["status"] == "equal" and by[f"{s}.sqp"]["slices"] == 4
    assert by[f"{s}.sqp"]["source_rows"] == by[f"{s}.sqp"]["target_rows"] == 1200
    assert by[f"{s}.plain"]["status"] == "equal" and by[f"{s}.plain"]["slicing"].startswith("key bucket")

    t = sql.Identifier(s, "sqp")
    one = "search_query = 'query 0'"
    pg.execute(sql.SQL("UPDATE {} SET impressions = impressions + 1 WHERE start_date = '2025-01-05' AND asin = 'B000000000'"
                       f" AND {one}").format(t))
    pg.execute(sql.SQL(f"DELETE FROM {{}} WHERE start_date = '2025-01-12' AND asin = 'B000000001' AND {one}").format(t))
    pg.execute(sql.SQL("INSERT INTO {} SELECT '2025-01-19', 'B0HANDMADE', search_query, impressions, click_share,"
                       f" median_price, updated_at FROM {{}} WHERE {one} LIMIT 1").format(t, t))
    pg.execute(sql.SQL("UPDATE {} SET median_price = median_price + 0.000000000 WHERE start_date = '2025-01-26'").format(t))
    plain = sql.Identifier(s, "plain")
    edited = pg.execute(sql.SQL("UPDATE {} SET click_share = NULL WHERE asin = 'B000000005' AND search_query = 'query 0'"
                                " RETURNING start_date, asin, search_query").format(plain)).fetchall()
    assert len(edited) == 1
    code, out = verify("--rows")
    assert code == 1
    by = {t["table"]: t for t in out["tables"]}
    sqp = by[f"{s}.sqp"]
    assert sqp["status"] == "differs"
    assert {d["slice"]: (d["source_rows"], d["target_rows"]) for d in sqp["differing"]} == {
        "2025-01-05": (300, 300), "2025-01-12": (300, 299), "2025-01-19": (300, 301)}
    assert sqp["bigquery_queries"] == 3  # the slices, one bisection step (300 rows -> 256 key segments), the rows
    assert [(r["key"]["asin"], r["key"]["start_date"], r["kind"], r["columns"]) for r in sqp["rows"]] == [
        ("B000000000", "2025-01-05", "differs", ["impressions"]), ("B000000001", "2025-01-12", "missing", []),
        ("B0HANDMADE", "2025-01-19", "extra", [])]
    assert [(r["key"]["asin"], r["kind"], r["columns"]) for r in by[f"{s}.plain"]["rows"]] == [
        ("B000000005", "differs", ["click_share"])]

    bucket = hashlib.md5("|".join([str(edited[0][0]), *(f"{len(v)}:{v}" for v in edited[0][1:])])  # noqa: S324
                         .encode()).hexdigest()[:2]
    assert [d["slice"] for d in by[f"{s}.plain"]["differing"]] == [bucket]

    # --repair: the rows verify located are re-read by key (a read session whose row restriction names them) and
    # exactly those keys replaced, in both tables; then verified again. Every other row keeps its xmin, in the
    # edited periods too.
    untouched = sql.SQL("SELECT start_date, asin, search_query, xmin::text FROM {} WHERE NOT (search_query = 'query 0'"
                        " AND asin IN ('B000000000', 'B000000001', 'B0HANDMADE')) ORDER BY 1, 2, 3")
    before = pg.execute(untouched.format(t)).fetchall()
    assert len(before) == 1198  # 1200, one deleted by hand, one made by hand (left out), one edited (left out)
    others = sql.SQL("SELECT asin, start_date, search_query, xmin::text FROM {} WHERE NOT (asin = 'B000000005' AND"
                     " search_query = 'query 0') ORDER BY 1, 2, 3")
    plain_before = pg.execute(others.format(plain)).fetchall()
    code, out = verify("--repair")
    by = {t["table"]: t for t in out["tables"]}
    assert code == 0, out
    assert by[f"{s}.sqp"]["status"] == by[f"{s}.plain"]["status"] == "equal"
    assert by[f"{s}.sqp"]["repair"]["repaired"] == "3 rows by key", by[f"{s}.sqp"]
    assert (by[f"{s}.sqp"]["repair"]["rows_inserted"], by[f"{s}.sqp"]["repair"]["rows_updated"],
            by[f"{s}.sqp"]["repair"]["rows_deleted"]) == (1, 1, 1)
    assert by[f"{s}.plain"]["repair"]["repaired"] == "1 rows by key" and by[f"{s}.plain"]["repair"]["rows_updated"] == 1
    assert pg.execute(untouched.format(t)).fetchall() == before
    assert pg.execute(others.format(plain)).fetchall() == plain_before
    assert_same_rows(source_rows(source, "sqp"), pg_rows(pg, f'"{s}".sqp', "1, 2, 3"), SQP_KEY)
    assert_same_rows(source_rows(source, "plain"), pg_rows(pg, f'"{s}".plain', "1, 2, 3"), SQP_KEY)
    audit = pg.execute(f"SELECT sync_metadata->'repair_keys', sync_metadata ? 'data_as_of' FROM \"{s}\".refresh_audit_log"
                       " WHERE table_name = 'sqp' ORDER BY id DESC LIMIT 1").fetchone()
    assert audit == (3, False)  # a repair's snapshot is not the table's freshness


def test_verify_is_refused_while_a_run_holds_the_table(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource,
) -> None:
    from tasks.locks import table_lock

    put_table(source, "plain", SQP_SCHEMA, sqp_rows(50))
    register_table(pg, registry, "plain", {"source": "plain", "key": SQP_KEY, "mode": "full"})
    assert refresh_table("plain")["status"] == "success"
    from blocks import resolve_resources

    with table_lock(resolve_resources(env).target, f"{registry}.plain", 0):
        code, out = verify("--table", "plain")
    assert code == 1
    (verdict,) = out["tables"]
    assert verdict["status"] == "not_verified" and "its lock is held" in verdict["notes"][0]
    register_table(pg, registry, "other", {"source": "plain", "key": SQP_KEY, "mode": "full"})
    code, out = verify("--select", f"{registry}.pl*")  # dbt's selectors, as for run
    assert code == 0 and [t["table"] for t in out["tables"]] == [f"{registry}.plain"], out


def test_weekly_maintenance_verifies_records_alerts_and_repairs_where_asked(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource, webhook: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flows.maintenance import maintenance_flow

    s = registry
    monkeypatch.setenv("REFRESH_WEBHOOK_URL", webhook.url)
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(200, weeks=4))
    register_table(pg, s, "sqp", {"source": "sqp", "key": SQP_KEY, "mode": "window", "window_column": "start_date"})
    put_table(source, "plain", SQP_SCHEMA, sqp_rows(100))
    register_table(pg, s, "plain", {"source": "plain", "key": SQP_KEY, "mode": "full"})
    assert refresh_table("sqp")["status"] == refresh_table("plain")["status"] == "success"
    pg.execute(sql.SQL("DELETE FROM {} WHERE start_date = '2025-01-12' AND asin = 'B000000001'").format(
        sql.Identifier(s, "sqp")))

    report = maintenance_flow(discover=False)
    assert report["verified"] == {f"{s}.sqp": "differs", f"{s}.plain": "equal"} and report["repaired"] == []
    (alert,) = [json.loads(r["body"]) for r in webhook.received if json.loads(r["body"])["event"] == "copy_differs"]
    assert alert["table"] == f"{s}.sqp" and alert["type"] == "data_mismatch" and "2025-01-12" in alert["error_message"]
    assert [d["slice"] for d in alert["details"]["slices"]] == ["2025-01-12"]
    checks = dict(pg.execute(f"SELECT metric_name, is_within_threshold FROM \"{s}\".refresh_data_quality"
                             " WHERE metric_name LIKE 'verify:%%'").fetchall())
    assert checks == {f"verify:{s}.sqp": False, f"verify:{s}.plain": True}

    register_table(pg, s, "sqp", {"source": "sqp", "key": SQP_KEY, "mode": "window", "window_column": "start_date",
                                  "auto_repair": True})
    report = maintenance_flow(discover=False)
    assert report["verified"] == {f"{s}.sqp": "equal", f"{s}.plain": "equal"} and report["repaired"] == [f"{s}.sqp"]
    assert_same_rows(source_rows(source, "sqp"), pg_rows(pg, f'"{s}".sqp', "1, 2, 3"), SQP_KEY)


def test_keys_kept_by_a_delete_policy_of_none_are_information_not_differences(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource,
) -> None:
    """An incremental table whose delete policy is none keeps rows deleted in BigQuery: verify bisects such a slice,
    lists the target-only keys as information and calls the table equal; a changed value still differs."""
    from blocks import resolve_resources
    from tasks.registry import get_entry
    from tasks.verify import verify_table

    s = registry
    rows = sqp_rows(300, weeks=2)
    put_table(source, "inc", SQP_SCHEMA, rows)
    register_table(pg, s, "inc", {"source": "inc", "key": SQP_KEY, "cursor": "updated_at", "window_column": "start_date"})
    assert refresh_table("inc")["status"] == "success"
    put_table(source, "inc", SQP_SCHEMA, rows.slice(1))  # row 0 (week 2025-01-05) deleted in BigQuery
    assert refresh_table("inc")["rows_deleted"] == 0
    res = resolve_resources(env)
    verdict = verify_table(res, get_entry(pg, s, "inc"))
    assert verdict.status == "equal" and verdict.differing == [], verdict
    assert [(r["slice"], r["key"]["asin"], r["kind"]) for r in verdict.kept_deleted] == [("2025-01-05", "B000000000", "extra")]
    assert any("kept by design" in n for n in verdict.notes), verdict.notes

    pg.execute(sql.SQL("UPDATE {} SET impressions = 0 WHERE start_date = '2025-01-12' AND asin = 'B000000003'"
                       " AND search_query = 'query 0'").format(
        sql.Identifier(s, "inc")))
    verdict = verify_table(res, get_entry(pg, s, "inc"), rows=True)
    assert verdict.status == "differs" and [d["slice"] for d in verdict.differing] == ["2025-01-12"]
    assert [(r["key"]["asin"], r["columns"]) for r in verdict.rows] == [("B000000003", ["impressions"])]

    # A budget BigQuery's dry run is over: refused before any query runs (the emulator estimates every query at 0
    # bytes, so only a negative budget is over it here; on BigQuery the job also carries maximumBytesBilled).
    refused = verify_table(res, get_entry(pg, s, "inc"), max_bytes=-1)
    assert refused.status == "not_verified" and refused.bigquery_queries == 0
    assert "over the budget of -1" in refused.notes[-1]


def test_what_the_nightly_cursor_cannot_see_is_found_and_mended(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource,
) -> None:
    """A restatement that kept its cursor value (in a column outside the critical fields) and a late row older
    than the watermark: the incremental night does not read them (by design); verify finds exactly their slices and
    rows, and --repair (the two rows re-read by key) makes the copy equal again."""
    from blocks import resolve_resources
    from tasks.registry import get_entry
    from tasks.verify import repair_table, verify_table

    s = registry
    first = sqp_rows(400, weeks=4)
    put_table(source, "inc", SQP_SCHEMA, first)
    register_table(pg, s, "inc", {"source": "inc", "key": SQP_KEY, "cursor": "updated_at", "lookback": "0",
                                  "window_column": "start_date", "critical_fields": ["impressions"]})
    assert refresh_table("inc")["status"] == "success"
    rows = first.to_pylist()
    restated = next(r for r in rows if str(r["start_date"]) == "2025-01-12")
    restated["median_price"] += Decimal(1)  # restated in BigQuery, its updated_at left as it was
    late = {**rows[0], "start_date": date(2025, 1, 19), "asin": "B0LATE0000", "updated_at": datetime(2024, 12, 1, tzinfo=UTC)}
    fresh = {**rows[0], "asin": "B0FRESH000", "updated_at": datetime(2025, 2, 1, tzinfo=UTC)}
    put_table(source, "inc", SQP_SCHEMA, pa.Table.from_pylist([*rows, late, fresh], schema=first.schema))
    night = refresh_table("inc")
    assert (night["status"], night["rows_inserted"], night["rows_updated"]) == ("success", 1, 0), night

    res = resolve_resources(env)
    verdict = verify_table(res, get_entry(pg, s, "inc"), rows=True)
    assert verdict.status == "differs"
    assert {d["slice"]: (d["source_rows"], d["target_rows"]) for d in verdict.differing} == {
        "2025-01-12": (100, 100), "2025-01-19": (101, 100)}
    assert [(r["key"]["asin"], r["kind"], r["columns"]) for r in verdict.rows] == [
        (restated["asin"], "differs", ["median_price"]), ("B0LATE0000", "missing", [])]

    run = repair_table(res, get_entry(pg, s, "inc"), verdict, refresh_table)
    assert (run["repaired"], run["rows_inserted"], run["rows_updated"]) == ("2 rows by key", 1, 1), run
    assert verify_table(res, get_entry(pg, s, "inc")).status == "equal"
    assert_same_rows(source_rows(source, "inc"), pg_rows(pg, f'"{s}".inc', "1, 2, 3"), SQP_KEY)


def test_columns_a_transform_makes_or_may_change_are_left_out_and_listed(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource,
) -> None:
    from blocks import resolve_resources
    from tasks.registry import get_entry
    from tasks.verify import verify_table

    s = registry
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(120, weeks=2))
    register_table(pg, s, "sqp", {"source": "sqp", "key": SQP_KEY, "mode": "window", "window_column": "start_date",
                                  "transform": "sqp_week_end"})
    assert refresh_table("sqp")["status"] == "success"
    res = resolve_resources(env)
    verdict = verify_table(res, get_entry(pg, s, "sqp"))
    assert verdict.status == "equal" and verdict.slices == 2, verdict
    assert verdict.excluded == ["impressions (transform sqp_week_end may change it)",
                                "click_share (transform sqp_week_end may change it)",
                                "median_price (transform sqp_week_end may change it)",
                                "updated_at (transform sqp_week_end may change it)",
                                "week_end_date (made by transform sqp_week_end)"]
    # The keys and the counts are still compared: a key deleted by hand shows.
    pg.execute(sql.SQL("DELETE FROM {} WHERE asin = 'B000000002' AND search_query = 'query 0'").format(sql.Identifier(s, "sqp")))
    assert [d["slice"] for d in verify_table(res, get_entry(pg, s, "sqp")).differing] == ["2025-01-05"]


@pytest.mark.parametrize("how", ["keys", "periods"])
def test_a_repair_is_not_a_night(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource, how: str,
) -> None:
    """A repair mends one row's period (or the row alone) while BigQuery holds changes the next night must read: a
    row of another period changed a day after the watermark, and a row of the repaired period two days after. The
    repair must not move the watermark to that row's cursor (the next night's read would start past the other
    change, and leave it stale with status success), nor count as the night (refresh time, freshness)."""
    from datetime import timedelta

    s = registry
    first = sqp_rows(200, weeks=2)
    put_table(source, "sqp", SQP_SCHEMA, first)
    register_table(pg, s, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at", "lookback": "0",
                                  "mode": "window", "window_column": "start_date"})
    assert refresh_table("sqp")["status"] == "success"
    night = pg.execute(f"SELECT c.watermark, c.last_refresh_at, c.next_refresh_at, f.data_as_of FROM \"{s}\".refresh_config c"
                       f" JOIN \"{s}\".refresh_freshness f USING (table_schema, table_name) WHERE c.table_name = 'sqp'"
                       ).fetchone()
    rows = first.to_pylist()
    wm = max(r["updated_at"] for r in rows)
    other = next(r for r in rows if str(r["start_date"]) == "2025-01-12")
    other.update(impressions=-1, updated_at=wm + timedelta(days=1))  # tonight's change, another period
    mended = next(r for r in rows if str(r["start_date"]) == "2025-01-05")
    mended.update(impressions=-2, updated_at=wm + timedelta(days=2))  # the row repaired, its cursor the latest
    put_table(source, "sqp", SQP_SCHEMA, pa.Table.from_pylist(rows, schema=first.schema))

    if how == "keys":
        run = refresh_table("sqp", repair_keys=[[str(mended["start_date"]), mended["asin"], mended["search_query"]]])
        assert (run["status"], run["rows_read"], run["rows_updated"], run["rows_deleted"]) == ("success", 1, 1, 0), run
    else:
        run = refresh_table("sqp", repair_periods=["2025-01-05"])
        assert (run["status"], run["rows_read"], run["rows_updated"]) == ("success", 100, 1), run
    after = pg.execute(f"SELECT c.watermark, c.last_refresh_at, c.next_refresh_at, f.data_as_of FROM \"{s}\".refresh_config c"
                       f" JOIN \"{s}\".refresh_freshness f USING (table_schema, table_name) WHERE c.table_name = 'sqp'"
                       ).fetchone()
    assert after == night  # watermark, refresh time, next slot and freshness as the night left them
    stale = pg.execute(sql.SQL("SELECT impressions FROM {} WHERE start_date = %s AND asin = %s AND search_query = %s").format(
        sql.Identifier(s, "sqp")), (other["start_date"], other["asin"], other["search_query"])).fetchone()
    assert stale is not None and stale[0] != -1  # not repaired: the next night's

    assert refresh_table("sqp")["status"] == "success"
    assert_same_rows(source_rows(source, "sqp"), pg_rows(pg, f'"{s}".sqp', "1, 2, 3"), SQP_KEY)


def test_a_table_past_its_verify_timeout_is_cancelled_and_not_verified(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource, pg_uri: str,
) -> None:
    """The weekly verify's per-table timeout: a target query that cannot finish (here: blocked by a lock a
    dashboard's migration holds) is cancelled at the deadline, and the table is reported not verified, naming the
    limit; the next table is not held up."""
    import time as clock

    from blocks import resolve_resources
    from tasks.registry import get_entry, update_table
    from tasks.verify import verify_table

    s = registry
    put_table(source, "plain", SQP_SCHEMA, sqp_rows(50))
    register_table(pg, s, "plain", {"source": "plain", "key": SQP_KEY, "mode": "full", "verify_timeout_seconds": 2})
    assert refresh_table("plain")["status"] == "success"
    res = resolve_resources(env)
    with psycopg.connect(pg_uri) as blocker:
        blocker.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(s, "plain")))
        started = clock.monotonic()
        verdict = verify_table(res, get_entry(pg, s, "plain"))
        waited = clock.monotonic() - started
    assert verdict.status == "not_verified", verdict
    assert "verify ran past its timeout of 2 s" in verdict.notes[-1] and "PostgreSQL's query cancelled" in verdict.notes[-1]
    assert waited < 30  # cancelled at the deadline, not when the lock went
    update_table(pg, s, "plain", params={"verify_timeout_seconds": 0})
    assert verify_table(res, get_entry(pg, s, "plain")).status == "equal"


def test_a_row_of_more_columns_than_a_function_takes_has_the_same_text(pg: psycopg.Connection[Any]) -> None:
    """PostgreSQL's functions take at most 100 arguments: the row text of 150 columns (concat_ws nested) is still
    the values joined by '|', NULL as 'n'."""
    columns = [digest.DigestColumn(f"c{i}", f"c{i}", "INT64") for i in range(150)]
    values = [None if i % 7 == 3 else i * 11 for i in range(150)]
    row = sql.SQL(", ").join(sql.SQL("{}::bigint AS {}").format(sql.Literal(v), sql.Identifier(f"c{i}"))
                             for i, v in enumerate(values))
    (text,) = pg.execute(sql.SQL("SELECT {} FROM (SELECT {}) t").format(digest.pg_row_text(columns, "t"), row)).fetchone()
    assert text == "|".join("n" if v is None else str(v) for v in values)


@pytest.mark.once
def test_a_query_source_is_verified_by_running_its_query_and_repaired(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource,
) -> None:
    """A query source: verify digests the query itself (its schema from a dry run; no past to read, so read as it
    is now, and said), finds the slices edited by hand, and --repair mends them; the copy then equals the query's
    rows value by value."""
    s = registry
    put_table(source, "raw", SQP_SCHEMA, sqp_rows(400, weeks=4))
    query = (f"SELECT start_date, asin, search_query, impressions, median_price FROM `{source.table_ref('raw')}`"  # noqa: S608
             " WHERE impressions >= 0 -- a comment at the end: verify wraps the query in parentheses")
    register_table(pg, s, "q", {"query": query, "key": SQP_KEY, "mode": "window", "window_column": "start_date"})
    assert refresh_table("q")["status"] == "success"
    code, out = verify("--table", f"{s}.q")
    assert code == 0, out
    (q,) = out["tables"]
    assert (q["status"], q["slices"], q["source_rows"], q["target_rows"]) == ("equal", 4, 400, 400), q
    assert any("query source has no past" in n for n in q["notes"]), q

    t = sql.Identifier(s, "q")
    pg.execute(sql.SQL("UPDATE {} SET impressions = impressions + 7 WHERE start_date = '2025-01-12'"
                       " AND search_query = 'query 1'").format(t))
    code, out = verify("--table", f"{s}.q", "--rows")
    assert code == 1, out
    (q,) = out["tables"]
    assert [d["slice"] for d in q["differing"]] == ["2025-01-12"]
    assert {(r["kind"], tuple(r["columns"])) for r in q["rows"]} == {("differs", ("impressions",))}
    code, out = verify("--table", f"{s}.q", "--repair")
    assert code == 0, out
    assert out["tables"][0]["status"] == "equal", out
    expected = [r for r in source_rows(source, "raw") if r["impressions"] >= 0]
    got = pg_rows(pg, f'"{s}".q', "1, 2, 3")
    assert_same_rows([{k: r[k] for k in ("start_date", "asin", "search_query", "impressions", "median_price")}
                      for r in expected], got, SQP_KEY)


def test_shadow_compare_is_exact_on_floats_json_and_arrays(pg: psycopg.Connection[Any], schema: str) -> None:
    """Two PostgreSQL copies (shadow compare) compare PostgreSQL's own text where BigQuery has none to share: a float
    one ulp apart, an array element and a JSON value differ; the same JSON written in another key order does not."""
    from tasks import shadow

    pg.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    for name in ("live", "shade"):
        pg.execute(sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, x double precision, j jsonb, a integer[],"
                           " n numeric(12,4))").format(sql.Identifier(schema, name)))
        pg.execute(sql.SQL("INSERT INTO {} SELECT i, i / 10.0, jsonb_build_object('a', i, 'b', 'x'), ARRAY[i, 2],"
                           " i * 1.5 FROM generate_series(1, 300) i").format(sql.Identifier(schema, name)))
    shade = sql.Identifier(schema, "shade")
    pg.execute(sql.SQL("UPDATE {} SET j = '{{\"b\": \"x\", \"a\": 5}}', n = 7.5000 WHERE id = 5").format(shade))
    assert shadow.compare(pg, (schema, "live"), (schema, "shade"), ["id"])["identical"] is True
    pg.execute(sql.SQL("UPDATE {} SET x = 'Infinity' WHERE id = 7").format(shade))
    pg.execute(sql.SQL("UPDATE {} SET x = x + 1e-15 WHERE id = 8").format(shade))
    pg.execute(sql.SQL("UPDATE {} SET a = ARRAY[9, 3] WHERE id = 9").format(shade))
    pg.execute(sql.SQL("UPDATE {} SET j = j || '{{\"c\": null}}' WHERE id = 10").format(shade))
    report = shadow.compare(pg, (schema, "live"), (schema, "shade"), ["id"])
    assert (report["identical"], report["complete"], report["different"], report["same"]) == (False, True, 4, 296)
    assert sorted((e["key"], e["columns"]) for e in report["examples"]) == [
        (["10"], ["j"]), (["7"], ["x"]), (["8"], ["x"]), (["9"], ["a"])]


def test_shadow_compare_matches_precisions_and_says_what_it_cannot_compare(pg: psycopg.Connection[Any], schema: str) -> None:
    """The live table's own DDL (numeric(12,2), varchar(50), numeric(12,2)[]) against the shadow's (numeric, text,
    numeric[]): compared by their canonical text, so an edit is found; a column of another kind on one side is not
    comparable and the copies are then never called identical; a column on one side only is named. Floats are
    compared at full precision even where the role rounds them (extra_float_digits = 0)."""
    from tasks import shadow

    pg.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    live, shade = sql.Identifier(schema, "live"), sql.Identifier(schema, "shade")
    pg.execute(sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, amount numeric(12,2), name varchar(50),"
                       " prices numeric(12,2)[], x float8, note text)").format(live))
    pg.execute(sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, amount numeric, name text, prices numeric[],"
                       " x float8, extra int)").format(shade))
    for t in (live, shade):
        pg.execute(sql.SQL("INSERT INTO {} (id, amount, name, prices, x) SELECT i, i * 1.25, 'n' || i,"
                           " ARRAY[i * 1.5, 2], 0.3 FROM generate_series(1, 100) i").format(t))
    pg.execute("SET extra_float_digits = 0")
    report = shadow.compare(pg, (schema, "live"), (schema, "shade"), ["id"])
    assert report["identical"] is True, (report["examples"], report["notes"], report["differing_slices"][:2])
    assert report["notes"] == ["column(s) extra, note in one of the two tables only: not compared"]
    pg.execute(sql.SQL("UPDATE {} SET x = 0.1::float8 + 0.2::float8 WHERE id = 3").format(shade))  # 0.3 when rounded
    pg.execute(sql.SQL("UPDATE {} SET amount = 9.99, prices = ARRAY[1, 2.5] WHERE id = 4").format(shade))
    report = shadow.compare(pg, (schema, "live"), (schema, "shade"), ["id"])
    assert sorted((e["key"], e["columns"]) for e in report["examples"]) == [(["3"], ["x"]), (["4"], ["amount", "prices"])]
    pg.execute(sql.SQL("UPDATE {} SET x = 0.3 WHERE id = 3; UPDATE {} SET amount = 5.00, prices = ARRAY[6.00, 2]"
                       " WHERE id = 4").format(shade, shade))
    assert shadow.compare(pg, (schema, "live"), (schema, "shade"), ["id"])["identical"] is True
    pg.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN name TYPE bytea USING convert_to(name, 'UTF8')").format(shade))
    report = shadow.compare(pg, (schema, "live"), (schema, "shade"), ["id"])
    assert report["identical"] is False and report["different"] == 0, report
    assert "column(s) name of another kind of type in the shadow table" in report["notes"][0], report
    pg.execute("RESET extra_float_digits")
