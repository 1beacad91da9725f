"""Row hashes live beside the live table, never in it: the users' schema is theirs.

The hashes that let a reload skip unchanged rows are kept in a side table of the staging schema, keyed by the
table's key, written in the publish's transaction. A reload skips a row only when its hash is kept for a key the
live table holds, so a row deleted by hand or a truncated table is loaded again; a table with rows but no hashes
(adopted, or made by hand) is verified on its first run without rewriting a row that is already equal (no
update trigger fires for it); an earlier version's ``_bqr_row_hash`` column goes (its hashes, made by another
function, are not kept).
Every target is compared with BigQuery by the independent comparator, which ignores no column.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
import pytest

from blocks import BigQuerySource
from bq_refresh.settings import Settings
from flows.refresh_table import refresh_table
from tasks.load import rowhash_table
from tasks.registry import register_table
from tests.bqdata import assert_same_rows, create_sqp_target, pg_rows, put_table, source_rows
from tests.test_engine import SQP_KEY, SQP_SCHEMA, T0, sqp_rows

pytestmark = [pytest.mark.emulator, pytest.mark.usefixtures("prefect_harness")]


def live(pg: psycopg.Connection[Any], s: str) -> list[dict[str, Any]]:
    return pg_rows(pg, f'"{s}".sqp', "1, 2, 3")


def columns(pg: psycopg.Connection[Any], s: str) -> list[str]:
    return [r[0] for r in pg.execute("SELECT column_name FROM information_schema.columns WHERE table_schema = %s"
                                     " AND table_name = 'sqp' ORDER BY ordinal_position", (s,))]


def kept(pg: psycopg.Connection[Any], env: Settings) -> int:
    row = pg.execute(f'SELECT count(*) FROM "{env.staging_schema}"."{rowhash_table(env.schema_name, "sqp")}"').fetchone()
    return int(row[0]) if row else -1


def test_the_live_table_holds_the_users_columns_and_a_row_deleted_by_hand_comes_back(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource,
) -> None:
    s = registry
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(1200))
    register_table(pg, s, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at", "lookback": "30d"})
    assert refresh_table("sqp")["direct_load"] is True
    assert columns(pg, s) == [f.name for f in SQP_SCHEMA]  # no bookkeeping column
    assert kept(pg, env) == 1200
    assert_same_rows(source_rows(source, "sqp"), live(pg, s), SQP_KEY)

    again = refresh_table("sqp")  # nothing changed: every row skipped by its kept hash
    assert (again["rows_skipped_unchanged"], again["rows_updated"], again["rows_inserted"]) == (1200, 0, 0)

    # A dashboard user deletes rows by hand; the source still has them. Their hashes are still kept, but for keys
    # the live table no longer holds: the next run loads them again.
    pg.execute(f'DELETE FROM "{s}".sqp WHERE asin = %s', ("B000000007",))
    run = refresh_table("sqp")
    assert run["rows_inserted"] > 0 and run["rows_updated"] == 0
    assert_same_rows(source_rows(source, "sqp"), live(pg, s), SQP_KEY)

    # Emptied by hand: loaded again whole (straight into the empty table), every hash kept afresh.
    pg.execute(f'TRUNCATE "{s}".sqp')
    run = refresh_table("sqp")
    assert run["rows_inserted"] == 1200
    assert_same_rows(source_rows(source, "sqp"), live(pg, s), SQP_KEY)
    assert kept(pg, env) == 1200


def test_an_existing_table_is_verified_without_rewriting_equal_rows_then_skipped_by_hash(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource,
) -> None:
    """Adoption: the users' table already holds the data (5 rows differ from BigQuery). The first run rewrites
    exactly those 5 (an update trigger fires 5 times, n_tup_upd grows by 5, the heap by at most 10%), fills every
    hash, and the next run stages nothing."""
    s = registry
    data = sqp_rows(2000)
    put_table(source, "sqp", SQP_SCHEMA, data)
    create_sqp_target(pg, s)
    with pg.cursor() as cur, cur.copy(f'COPY "{s}".sqp (start_date, asin, search_query, impressions, click_share,'
                                      " median_price, updated_at) FROM STDIN") as copy:
        for i, r in enumerate(data.to_pylist()):
            copy.write_row([r["start_date"], r["asin"], r["search_query"], r["impressions"] + (1 if i < 5 else 0),
                            r["click_share"], r["median_price"], r["updated_at"]])
    pg.execute(f'CREATE TABLE "{s}".fired (n int)')
    pg.execute(f'CREATE FUNCTION "{s}".count_update() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN'
               f' INSERT INTO "{s}".fired VALUES (1); RETURN NEW; END $$')
    pg.execute(f'CREATE TRIGGER on_update AFTER UPDATE ON "{s}".sqp FOR EACH ROW EXECUTE FUNCTION "{s}".count_update()')
    before = columns(pg, s)
    pg.execute(f'VACUUM "{s}".sqp')
    size = pg.execute("SELECT pg_relation_size(%s)", (f'"{s}".sqp',)).fetchone()
    upd = pg.execute("SELECT n_tup_upd FROM pg_stat_user_tables WHERE schemaname = %s AND relname = 'sqp'", (s,)).fetchone()
    register_table(pg, s, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at", "mode": "full"})

    first = refresh_table("sqp")
    assert (first["rows_inserted"], first["rows_updated"], first["rows_deleted"]) == (0, 5, 0), first
    assert pg.execute(f'SELECT count(*) FROM "{s}".fired').fetchone() == (5,)
    assert columns(pg, s) == before  # the users' DDL untouched
    assert kept(pg, env) == 2000
    assert_same_rows(source_rows(source, "sqp"), live(pg, s), SQP_KEY)
    grown = pg.execute("SELECT pg_relation_size(%s)", (f'"{s}".sqp',)).fetchone()
    assert size is not None and grown is not None and grown[0] <= 1.10 * size[0], (size, grown)  # no bloat

    second = refresh_table("sqp")
    assert (second["rows_skipped_unchanged"], second["rows_updated"]) == (2000, 0), second
    assert pg.execute(f'SELECT count(*) FROM "{s}".fired').fetchone() == (5,)
    import time

    deadline = time.monotonic() + 15  # a pooled server session reports its statistics a little late
    while True:
        after = pg.execute("SELECT n_tup_upd FROM pg_stat_user_tables WHERE schemaname = %s AND relname = 'sqp'",
                           (s,)).fetchone()
        if (after and upd and after[0] - upd[0] >= 5) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert after is not None and upd is not None and after[0] - upd[0] == 5


def test_an_earlier_versions_hash_column_goes_and_no_row_is_rewritten(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource,
) -> None:
    """The ``_bqr_row_hash`` column of the versions before the side table held Polars-made hashes, which this version
    cannot reproduce: the column goes, its hashes are not kept; the run stages every row once and rewrites none."""
    s = registry
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(600))
    register_table(pg, s, "sqp", {"source": "sqp", "key": SQP_KEY, "mode": "full"})
    assert refresh_table("sqp")["rows_inserted"] == 600
    # As an earlier version left it: the hashes in a column of the live table, no side table.
    side = f'"{env.staging_schema}"."{rowhash_table(s, "sqp")}"'
    pg.execute(f'ALTER TABLE "{s}".sqp ADD COLUMN _bqr_row_hash bigint')
    pg.execute(f'UPDATE "{s}".sqp t SET _bqr_row_hash = r.h # 6148914691236517205 FROM {side} r'
               " WHERE (r.start_date, r.asin, r.search_query) = (t.start_date, t.asin, t.search_query)")
    pg.execute(f"DROP TABLE {side}")
    run = refresh_table("sqp")  # nothing changed in BigQuery: every row staged once, none rewritten
    assert "_bqr_row_hash" not in columns(pg, s)
    assert kept(pg, env) == 600
    assert (run["rows_skipped_unchanged"], run["rows_updated"], run["rows_inserted"]) == (0, 0, 0), run
    assert_same_rows(source_rows(source, "sqp"), live(pg, s), SQP_KEY)
    again = refresh_table("sqp")
    assert (again["rows_skipped_unchanged"], again["rows_updated"]) == (600, 0), again
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(600, updated=T0.replace(day=6)))  # every row's cursor moves
    assert refresh_table("sqp")["rows_updated"] == 600
    assert_same_rows(source_rows(source, "sqp"), live(pg, s), SQP_KEY)


@pytest.mark.once  # an upgrade's path, the same on either server
def test_hashes_of_an_earlier_hash_function_go_once_and_no_row_is_rewritten(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource, caplog: pytest.LogCaptureFixture,
) -> None:
    """Upgrading from the Polars-based hashes (bq-refresh 0.1): the side table's marker names no hash function, its
    hashes cannot be reproduced. The first run stages every row, rewrites none (no update trigger fires), keeps
    the new hashes; the next one skips every row."""
    s = registry
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(800))
    register_table(pg, s, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at", "mode": "full"})
    assert refresh_table("sqp")["rows_inserted"] == 800
    side = f'"{env.staging_schema}"."{rowhash_table(s, "sqp")}"'
    marker = pg.execute(f"SELECT obj_description('{side}'::regclass, 'pg_class')").fetchone()
    assert marker is not None and str(marker[0]).endswith(", xxh64-v1)")
    # As 0.1 left it: a marker without the function's name, and hashes this version would never compute.
    pg.execute(f"COMMENT ON TABLE {side} IS " + "'" + str(marker[0]).removesuffix(", xxh64-v1)") + ")'")
    pg.execute(f"UPDATE {side} SET h = h # 6148914691236517205")
    pg.execute(f'CREATE TABLE "{s}".fired (n int)')
    pg.execute(f'CREATE FUNCTION "{s}".count_update() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN'
               f' INSERT INTO "{s}".fired VALUES (1); RETURN NEW; END $$')
    pg.execute(f'CREATE TRIGGER on_update AFTER UPDATE ON "{s}".sqp FOR EACH ROW EXECUTE FUNCTION "{s}".count_update()')

    oid = pg.execute(f"SELECT '{side}'::regclass::oid").fetchone()
    with caplog.at_level(logging.WARNING, logger="tasks.load"):
        first = refresh_table("sqp")
    assert "made by an earlier hash function; this run stages every row once" in caplog.text
    assert pg.execute(f"SELECT '{side}'::regclass::oid").fetchone() != oid  # made afresh, not kept
    assert pg.execute(f"SELECT obj_description('{side}'::regclass, 'pg_class')").fetchone() == marker
    assert (first["rows_skipped_unchanged"], first["rows_updated"], first["rows_inserted"]) == (0, 0, 0), first
    assert pg.execute(f'SELECT count(*) FROM "{s}".fired').fetchone() == (0,)
    assert kept(pg, env) == 800
    assert_same_rows(source_rows(source, "sqp"), live(pg, s), SQP_KEY)
    second = refresh_table("sqp")
    assert (second["rows_skipped_unchanged"], second["rows_updated"]) == (800, 0), second
    assert_same_rows(source_rows(source, "sqp"), live(pg, s), SQP_KEY)


def test_maintenance_drops_the_side_tables_that_no_longer_stand_for_a_registered_live_table(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource,
) -> None:
    """A side table whose live table was dropped, dropped and made again, or renamed, or whose table left the
    registry, is dropped by maintenance; the others' stay, and so does a table of that suffix that is not ours."""
    from tasks.maintenance import drop_orphaned_rowhashes

    s = registry
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(100))
    for name in ("kept", "dropped", "remade", "renamed", "unregistered"):
        register_table(pg, s, name, {"source": "sqp", "key": SQP_KEY, "mode": "full"})
        assert refresh_table(name)["status"] == "success"
    staging = env.staging_schema
    pg.execute(f'CREATE TABLE "{staging}".notes_rowhash (n int)')  # someone else's, no marker of ours

    def sides() -> set[str]:
        return {str(r[0]) for r in pg.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s"
                                              " AND tablename LIKE '%%_rowhash'", (staging,))}

    assert sides() == {rowhash_table(s, n) for n in ("kept", "dropped", "remade", "renamed", "unregistered")} | {
        "notes_rowhash"}
    pg.execute(f'DROP TABLE "{s}".dropped')
    pg.execute(f'DROP TABLE "{s}".remade')
    pg.execute(f'CREATE TABLE "{s}".remade (LIKE "{s}".kept INCLUDING ALL)')
    pg.execute(f'ALTER TABLE "{s}".renamed RENAME TO renamed_by_hand')
    pg.execute(f"DELETE FROM \"{s}\".refresh_config WHERE table_name = 'unregistered'")

    gone = drop_orphaned_rowhashes(pg, s, staging, env.shadow_schema)
    assert sorted(gone) == sorted(rowhash_table(s, n) for n in ("dropped", "remade", "renamed", "unregistered"))
    assert sides() == {rowhash_table(s, "kept"), "notes_rowhash"}
    assert drop_orphaned_rowhashes(pg, s, staging, env.shadow_schema) == []
    again = refresh_table("kept")  # its hashes still serve
    assert again["rows_skipped_unchanged"] == 100, again
    run = refresh_table("remade")  # the table made again gets a fresh side table and its rows
    assert run["rows_inserted"] == 100, run
    assert_same_rows(source_rows(source, "sqp"), pg_rows(pg, f'"{s}".remade', "1, 2, 3"), SQP_KEY)


@pytest.mark.once  # the merge's guard, the same on either server
def test_a_float_that_turns_to_minus_zero_is_rewritten_not_left_stale(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource,
) -> None:
    """-0.0 and 0.0 are equal to PostgreSQL's IS DISTINCT FROM but differ in the source (and in the row hash): the
    merge must write the change, or the side table would keep the new hash over a stale row, skipped every night."""
    import pyarrow as pa

    from tests.bqdata import bq_schema

    schema = bq_schema([("k", "INT64", "REQUIRED"), ("f", "FLOAT64"), ("fs", "FLOAT64", "REPEATED")])

    def rows(sign: float) -> pa.Table:
        return pa.table({"k": pa.array([1, 2], pa.int64()), "f": pa.array([0.0 * sign, 1.5], pa.float64()),
                         "fs": pa.array([[0.0 * sign], [2.5]], pa.list_(pa.float64()))})

    put_table(source, "floats", schema, rows(1.0))
    register_table(pg, registry, "floats", {"source": "floats", "key": ["k"], "mode": "full"})
    assert refresh_table("floats")["rows_inserted"] == 2
    put_table(source, "floats", schema, rows(-1.0))
    bq = [r["f"] for r in source_rows(source, "floats") if r["k"] == 1]
    if str(bq[0]) != "-0.0":
        pytest.skip("the emulator does not keep -0.0 (BigQuery does: FLOAT64 is IEEE 754)")
    run = refresh_table("floats")
    assert run["rows_updated"] == 1, run
    assert pg.execute(f'SELECT f::text, fs::text FROM "{registry}".floats WHERE k = 1').fetchone() == ("-0", "{-0}")
    again = refresh_table("floats")
    assert (again["rows_skipped_unchanged"], again["rows_updated"]) == (2, 0), again
