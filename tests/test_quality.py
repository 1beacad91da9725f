"""The quality gate, dry run, shadow mode and dependent views, against the emulator and real PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from blocks import BigQuerySource, PostgresTarget, Resources
from bq_refresh.errors import QualityCheckFailed
from bq_refresh.settings import Settings
from flows.daily_refresh import daily_refresh
from flows.refresh_table import refresh_table
from tasks import sync
from tasks.migrations import apply_migrations
from tasks.registry import get_entry, register_table
from tests.bqdata import put_table
from tests.conftest import ROOT
from tests.test_engine import SQP_KEY, SQP_SCHEMA, sqp_rows

pytestmark = [pytest.mark.emulator, pytest.mark.usefixtures("prefect_harness")]
SPEC = {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"}


@pytest.fixture
def setup(env: Settings, pg: psycopg.Connection[Any]) -> tuple[Resources, str]:
    apply_migrations(pg, env.schema_name)
    assert env.database_url is not None
    res = Resources(BigQuerySource.from_settings(env), PostgresTarget(url=env.database_url), env)
    put_table(res.source, "sqp", SQP_SCHEMA, sqp_rows(200))
    return res, env.schema_name


def staged_plan(res: Resources, pg: psycopg.Connection[Any], schema: str, name: str) -> sync.RefreshPlan:
    plan = sync.plan_refresh(res, get_entry(pg, schema, name))
    sync.stage_rows(res, plan)
    return plan


def quality_rows(pg: psycopg.Connection[Any], schema: str) -> dict[str, bool]:
    return dict(pg.execute(f'SELECT metric_name, is_within_threshold FROM "{schema}".refresh_data_quality').fetchall())


@pytest.mark.parametrize("tamper, failing", [
    ("UPDATE {staging} SET median_price = median_price + 0.000000001 WHERE ctid = (SELECT min(ctid) FROM {staging})",
     {"checksum"}),
    ("DELETE FROM {staging} WHERE ctid = (SELECT min(ctid) FROM {staging})", {"checksum", "row_count"}),
])
def test_a_changed_or_missing_staged_row_is_caught_and_nothing_published(
    setup: tuple[Resources, str], pg: psycopg.Connection[Any], tamper: str, failing: set[str]
) -> None:
    res, schema = setup
    register_table(pg, schema, "sqp", {**SPEC, "direct_initial_load": False})  # tampers with the staging table
    plan = staged_plan(res, pg, schema, "sqp")
    pg.execute(tamper.format(staging=f'"{plan.staging_schema}"."{plan.staging_table}"'))
    with pytest.raises(QualityCheckFailed, match="nothing published") as err:
        sync.check_staged(res, plan, audit_id=None)
    assert {c["name"] for c in err.value.context["checks"]} == failing
    assert pg.execute(f'SELECT count(*) FROM "{schema}".sqp').fetchone() == (0,)
    assert {k for k, ok in quality_rows(pg, schema).items() if not ok} == failing
    assert pg.execute("SELECT to_regclass(%s)", (f'"{plan.staging_schema}"."{plan.staging_table}"',)).fetchone() == (None,)


def test_untampered_data_passes_every_check(setup: tuple[Resources, str], pg: psycopg.Connection[Any]) -> None:
    res, schema = setup
    register_table(pg, schema, "sqp", {**SPEC, "critical_fields": ["impressions", "median_price"]})
    result = refresh_table("sqp")
    assert result["status"] == "success" and result["checks_warned"] == []
    # incremental without deletes promises no count of the whole table: no reconciliation row that proves nothing
    assert quality_rows(pg, schema) == {"row_count": True, "checksum": True, "published_count": True}


def test_an_orphan_fails_the_foreign_key_check(setup: tuple[Resources, str], pg: psycopg.Connection[Any]) -> None:
    res, schema = setup
    pg.execute(f'CREATE TABLE "{schema}".asins (asin text PRIMARY KEY)')
    pg.execute(f'INSERT INTO "{schema}".asins SELECT DISTINCT \'B0\' || lpad(i::text, 8, \'0\') FROM generate_series(0, 95) i')
    fk = {"foreign_keys": [{"columns": ["asin"], "parent": f"{schema}.asins"}]}
    register_table(pg, schema, "sqp", {**SPEC, "checks": fk})
    with pytest.raises(QualityCheckFailed, match=r"foreign_key:asin->.*1 staged key\(s\) without a parent"):
        refresh_table("sqp")
    assert pg.execute(f'SELECT count(*) FROM "{schema}".sqp').fetchone() == (0,)
    pg.execute(f'INSERT INTO "{schema}".asins VALUES (\'B000000096\')')
    assert refresh_table("sqp")["rows_inserted"] == 200


def test_soft_thresholds_warn_and_publish(setup: tuple[Resources, str], pg: psycopg.Connection[Any]) -> None:
    res, schema = setup
    checks = {"ranges": {"click_share": [0, 0.1]}, "max_null_rate": {"impressions": 0.0},
              "not_greater_than": [["click_share", "median_price"]]}
    register_table(pg, schema, "sqp", {**SPEC, "checks": checks})
    result = refresh_table("sqp")
    assert result["status"] == "warning" and result["checks_warned"] == ["range:click_share"]
    assert result["rows_inserted"] == 200
    row = pg.execute(f'SELECT metric_value, threshold_min, threshold_max FROM "{schema}".refresh_data_quality'
                     " WHERE metric_name = 'range:click_share'").fetchone()
    assert row == (Decimal(99), Decimal(0), Decimal("0.1"))


def test_dry_run_reports_changes_and_writes_nothing(setup: tuple[Resources, str], pg: psycopg.Connection[Any]) -> None:
    res, schema = setup
    register_table(pg, schema, "sqp", {**SPEC, "delete_policy": {"mode": "hard"}})
    refresh_table("sqp")
    rows = sqp_rows(200).to_pylist()
    rows.pop(0)
    later = rows[-1]["updated_at"].replace(year=2026)
    rows[0].update(impressions=-1, updated_at=later)
    rows.append({**rows[1], "search_query": "brand new", "updated_at": later})
    import pyarrow as pa

    put_table(res.source, "sqp", SQP_SCHEMA, pa.Table.from_pylist(rows, schema=sqp_rows(1).schema))
    before = pg.execute(f'SELECT md5(string_agg(t::text, \'\' ORDER BY t::text)) FROM "{schema}".sqp t').fetchone()
    report = refresh_table("sqp", dry_run=True)
    assert (report["rows_inserted"], report["rows_updated"], report["rows_deleted"]) == (1, 1, 1)
    after = pg.execute(f'SELECT md5(string_agg(t::text, \'\' ORDER BY t::text)) FROM "{schema}".sqp t').fetchone()
    assert before == after


def test_shadow_mode_leaves_live_untouched_and_compare_reports(setup: tuple[Resources, str], pg: psycopg.Connection[Any],
                                                               env: Settings, tmp_path: Path) -> None:
    res, schema = setup
    register_table(pg, schema, "sqp", SPEC)
    refresh_table("sqp")
    live_before = pg.execute(f'SELECT count(*), sum(impressions) FROM "{schema}".sqp').fetchone()
    rows = sqp_rows(200).to_pylist()
    rows[3]["impressions"] = 1
    import pyarrow as pa

    put_table(res.source, "sqp", SQP_SCHEMA, pa.Table.from_pylist(rows[:-1], schema=sqp_rows(1).schema))
    register_table(pg, schema, "sqp", {**SPEC, "shadow": True,
                                       "delete_policy": {"mode": "hard", "max_delete_fraction": 1}})
    shadow_run = refresh_table("sqp")
    assert shadow_run["target"] == f"{env.shadow_schema}.sqp"
    assert pg.execute(f'SELECT count(*), sum(impressions) FROM "{schema}".sqp').fetchone() == live_before

    assert env.database_url is not None
    cli_env = {**os.environ, "BQ_REFRESH_DATABASE_URL": env.database_url.get_secret_value(), "BQ_REFRESH_SCHEMA": schema,
               "BQ_REFRESH_STATE_DIR": str(tmp_path)}
    compared = subprocess.run([sys.executable, "-m", "flows.cli", "shadow", "compare", "sqp", "--json"], cwd=ROOT,
                              env=cli_env, capture_output=True, text=True, timeout=120)
    assert compared.returncode == 1, compared.stderr
    report = json.loads(compared.stdout)
    assert (report["only_in_live"], report["only_in_shadow"], report["different"], report["same"]) == (1, 0, 1, 198)
    # Through tasks/digest.py, as verify: the key buckets (no window column) that differ, then the rows below them.
    dropped, edited = sqp_rows(200).to_pylist()[-1], rows[3]
    assert report["slicing"].startswith("key bucket") and report["complete"] is True
    assert sorted((e["key"], e["difference"], e["columns"]) for e in report["examples"]) == sorted([
        ([str(dropped[k]) for k in SQP_KEY], "only in live", []),
        ([str(edited[k]) for k in SQP_KEY], "different", ["impressions"])])
    def bucket(row: dict[str, Any]) -> str:  # the key's canonical text (written out here), its MD5's first 2 hex digits
        text = "|".join([str(row["start_date"]), *(f"{len(row[k])}:{row[k]}" for k in ("asin", "search_query"))])
        return hashlib.md5(text.encode()).hexdigest()[:2]  # noqa: S324
    assert {d["slice"] for d in report["differing_slices"]} == {bucket(dropped), bucket(edited)}

    cut = subprocess.run([sys.executable, "-m", "flows.cli", "shadow", "cutover", "sqp"], cwd=ROOT, env=cli_env,
                         capture_output=True, text=True, timeout=120)
    assert cut.returncode == 0, cut.stderr
    # Cutover: no --full-refresh needed; the watermark belonged to the shadow table, so everything is read.
    live_run = refresh_table("sqp")
    assert live_run["target"] == f"{schema}.sqp" and live_run["full"] is True and live_run["rows_read"] == 199
    assert (live_run["rows_updated"], live_run["rows_deleted"]) == (1, 1)
    assert pg.execute(f'SELECT count(*) FROM "{schema}".sqp').fetchone() == (199,)


def test_materialized_views_refresh_in_order_only_when_their_tables_changed(
    setup: tuple[Resources, str], pg: psycopg.Connection[Any]
) -> None:
    res, schema = setup
    s = f'"{schema}"'
    register_table(pg, schema, "sqp", SPEC)
    register_table(pg, schema, "other", {**SPEC, "source": "sqp2"})
    put_table(res.source, "sqp2", SQP_SCHEMA, sqp_rows(10))
    refresh_table("sqp")
    refresh_table("other")
    pg.execute(f"CREATE MATERIALIZED VIEW {s}.weekly AS SELECT start_date, asin, sum(impressions) AS impressions"
               f" FROM {s}.sqp GROUP BY 1, 2")
    pg.execute(f"CREATE UNIQUE INDEX ON {s}.weekly (start_date, asin)")
    pg.execute(f"CREATE MATERIALIZED VIEW {s}.monthly AS SELECT asin, sum(impressions) AS impressions FROM {s}.weekly GROUP BY 1")
    pg.execute(f"CREATE VIEW {s}.top AS SELECT * FROM {s}.monthly ORDER BY impressions DESC")
    pg.execute(f"CREATE MATERIALIZED VIEW {s}.other_mv AS SELECT count(*) AS n FROM {s}.other")

    put_table(res.source, "sqp", SQP_SCHEMA, sqp_rows(200, updated=sqp_rows(1).column("updated_at")[0].as_py()
                                                       .replace(year=2026)))
    state = daily_refresh(force=True, return_state=True)
    summary = state.result()
    assert isinstance(summary, dict)
    views = {v["view"].split(".")[1]: v for v in summary["views"]}
    assert views["weekly"]["refreshed"] and views["weekly"]["concurrently"]
    assert views["monthly"]["refreshed"] and not views["monthly"]["concurrently"]
    assert "other_mv" not in views or not views["other_mv"]["refreshed"]  # its table did not change
    assert all(v["queryable"] for v in views.values()) and "top" in views
    order = [r[0] for r in pg.execute(f"SELECT view_name FROM {s}.materialized_view_refresh_status ORDER BY id")]
    assert order == ["weekly", "monthly"]
    total = pg.execute(f"SELECT sum(impressions) FROM {s}.top").fetchone()
    assert total == pg.execute(f"SELECT sum(impressions) FROM {s}.sqp").fetchone()


def test_a_bulk_load_into_an_empty_table_rebuilds_its_secondary_indexes(
    setup: tuple[Resources, str], pg: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    res, schema = setup
    pg.execute(f'CREATE TABLE "{schema}".sqp (start_date date, asin text, search_query text, impressions bigint,'
               " click_share numeric(38,9), median_price numeric(38,9), updated_at timestamptz,"
               " PRIMARY KEY (start_date, asin, search_query))")
    pg.execute(f'CREATE INDEX sqp_by_asin ON "{schema}".sqp (asin, start_date)')
    pg.execute(f'CREATE VIEW "{schema}".sqp_v AS SELECT asin FROM "{schema}".sqp')
    monkeypatch.setenv("REFRESH_INDEX_REBUILD_MIN_ROWS", "100")
    register_table(pg, schema, "sqp", {**SPEC, "direct_initial_load": False})  # the staged path's own rebuild
    first = refresh_table("sqp")
    assert first["indexes_rebuilt"] == ["sqp_by_asin"] and first["rows_inserted"] == 200
    assert pg.execute("SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND indexname = 'sqp_by_asin'",
                      (schema,)).fetchone() is not None
    assert refresh_table("sqp", full_refresh=True)["indexes_rebuilt"] == []  # not empty any more
