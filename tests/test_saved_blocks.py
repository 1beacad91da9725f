"""Saved blocks, as a deployment uses them: a refresh whose only configuration is the names of a saved
BigQuerySource and a saved PostgresTarget (the target given as prefect-sqlalchemy ConnectionComponents, round-tripped
through the Prefect server), with no database URL and no BigQuery setting in its environment; and a block name that
is set but not saved: a clear error naming it, never an embedded PostgreSQL started in its place."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prefect.settings import PREFECT_API_URL
from prefect_sqlalchemy import ConnectionComponents
from psycopg.conninfo import conninfo_to_dict

from blocks import BigQuerySource, PostgresTarget
from blocks.postgres import components_uri
from bq_refresh.settings import Settings
from tasks.registry import register_table
from tests.bqdata import assert_same_rows, pg_rows, put_table, source_rows
from tests.conftest import ROOT
from tests.test_engine import SQP_KEY, SQP_SCHEMA, sqp_rows

pytestmark = [pytest.mark.emulator, pytest.mark.usefixtures("prefect_harness")]


def components(url: str) -> ConnectionComponents:
    """The test server's URI as ConnectionComponents (host, port, database, user, password; the rest as query)."""
    parts = {k: str(v) for k, v in conninfo_to_dict(url).items() if v is not None}
    query = {k: v for k, v in parts.items() if k not in {"host", "port", "dbname", "user", "password"}}
    return ConnectionComponents(driver="postgresql+psycopg2", host=parts.get("host"), port=int(parts["port"]) if "port"
                                in parts else None, database=parts["dbname"], username=parts.get("user"),
                                password=parts.get("password"), query=query or None)


def blocks_only_env(tmp_path: Path, settings: Settings, **names: str) -> dict[str, str]:
    """The process environment less every bq-refresh and BigQuery setting, plus the block names given."""
    drop = {str(f.validation_alias) for f in Settings.model_fields.values()} | {"GOOGLE_APPLICATION_CREDENTIALS"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "BQ_REFRESH_SCHEMA": settings.schema_name,
            "BQ_REFRESH_STAGING_SCHEMA": settings.staging_schema, "BQ_REFRESH_STATE_DIR": str(tmp_path / "state"),
            "COLUMNS": "200", **names}


def test_a_refresh_configured_by_saved_blocks_alone(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource, tmp_path: Path,
) -> None:
    assert env.database_url is not None
    url = env.database_url.get_secret_value()
    BigQuerySource.from_settings(env).save("night-source", overwrite=True)
    PostgresTarget(connection_info=components(url)).save("night-target", overwrite=True)
    saved = PostgresTarget.load("night-target")
    assert saved.url is None and isinstance(saved.connection_info, ConnectionComponents)
    with psycopg.connect(saved.uri()) as conn:  # the round-tripped components reach the same server
        assert conn.execute("SELECT current_database(), inet_server_port()").fetchone() == pg.execute(
            "SELECT current_database(), inet_server_port()").fetchone()

    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(150))
    register_table(pg, registry, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})
    cli_env = blocks_only_env(tmp_path, env, BQ_REFRESH_SOURCE_BLOCK="night-source",
                              BQ_REFRESH_TARGET_BLOCK="night-target")
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--table", f"{registry}.sqp", "--json"], cwd=ROOT,
                          env=cli_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["tables"][0]["status"] == "success", done.stdout
    assert_same_rows(source_rows(source, "sqp"), pg_rows(pg, f'"{registry}".sqp', "1, 2, 3"), SQP_KEY)
    assert not (tmp_path / "state" / "pgdata").exists()  # no embedded PostgreSQL was started


@pytest.mark.once
def test_a_block_name_not_saved_is_an_error_naming_it(env: Settings, registry: str, tmp_path: Path) -> None:
    for setting in ("BQ_REFRESH_TARGET_BLOCK", "BQ_REFRESH_SOURCE_BLOCK"):
        cli_env = blocks_only_env(tmp_path, env, **{setting: "no-such-block"})
        done = subprocess.run([sys.executable, "-m", "flows.cli", "tables", "list"], cwd=ROOT, env=cli_env,
                              capture_output=True, text=True, timeout=120)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2 and len(lines) == 1, (done.returncode, done.stderr[-3000:])
        assert lines[0].startswith(f"error: {setting}=no-such-block: no saved "), lines
        assert not (tmp_path / "state" / "pgdata").exists()  # the source block is looked up first


@pytest.mark.once
def test_connection_components_become_a_libpq_uri_with_every_part_encoded() -> None:
    c = ConnectionComponents(driver="postgresql+psycopg2", host="db.example.supabase.co", port=6543,
                             database="post gres", username="bq.refresh", password="p w@/:?",
                             query={"sslmode": "require", "options": "-c search_path=a b"})
    assert components_uri(c) == ("postgresql://bq.refresh:p%20w%40%2F%3A%3F@db.example.supabase.co:6543/post%20gres"
                                 "?sslmode=require&options=-c%20search_path%3Da%20b")
    parsed = conninfo_to_dict(components_uri(c))
    assert (parsed["password"], parsed["dbname"], parsed["options"]) == ("p w@/:?", "post gres", "-c search_path=a b")
    with pytest.raises(ValueError, match="driver mysql\\+pymysql is not PostgreSQL's"):
        components_uri(ConnectionComponents(driver="mysql+pymysql", database="d"))
