"""The HTTP API against a real PostgreSQL (FastAPI's test client), and the operator CLI end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from bq_refresh.settings import Settings
from flows.api import create_app
from tasks.migrations import apply_migrations
from tasks.registry import register_table
from tests.conftest import ROOT

TOKEN = "api-token-s3cr3t-9d2"
SPEC = {"source": "sqp", "key": ["id"], "cursor": "updated_at"}


def audit(pg: psycopg.Connection[Any], schema: str, table: str, status: str, hours_ago: float, error: str | None = None) -> None:
    pg.execute(
        f'INSERT INTO "{schema}".refresh_audit_log (table_schema, table_name, refresh_started_at, refresh_completed_at,'
        " status, rows_processed, rows_inserted, rows_updated, rows_deleted, execution_time_ms, error_message)"
        " VALUES (%s, %s, now() - make_interval(secs => %s), now() - make_interval(secs => %s), %s, 10, 4, 3, 1, 1500, %s)",
        (schema, table, hours_ago * 3600 + 2, hours_ago * 3600, status, error),
    )


@pytest.fixture
def api(settings: Settings, pg: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch) -> TestClient:
    apply_migrations(pg, settings.schema_name)
    configured = settings.model_copy(update={"api_token": __import__("pydantic").SecretStr(TOKEN)})
    return TestClient(create_app(configured))


def test_health_turns_503_naming_stale_and_failed_tables(api: TestClient, settings: Settings,
                                                         pg: psycopg.Connection[Any]) -> None:
    schema = settings.schema_name
    for name in ("fresh", "stale", "broken"):
        register_table(pg, schema, name, SPEC, frequency_hours=24)
    register_table(pg, schema, "off", SPEC, enabled=False)
    audit(pg, schema, "fresh", "success", 1)
    audit(pg, schema, "stale", "success", 30)
    audit(pg, schema, "broken", "success", 2)
    audit(pg, schema, "broken", "failed", 1, "source table missing")

    response = api.get("/health")
    assert response.status_code == 503
    problems = {p["table"]: p["reason"] for p in response.json()["problems"]}
    assert set(problems) == {f"{schema}.stale", f"{schema}.broken"}
    assert problems[f"{schema}.stale"].startswith("stale: last success 30.0 h ago")
    assert "source table missing" in problems[f"{schema}.broken"]

    audit(pg, schema, "stale", "success", 0.1)
    audit(pg, schema, "broken", "success", 0.1)
    healthy = api.get("/health")
    assert healthy.status_code == 200 and healthy.json()["tables_enabled"] == 3

    raw = api.get("/status")
    assert raw.status_code == 200, raw.text
    status = {r["table"]: r for r in raw.json()}
    assert status[f"{schema}.off"]["healthy"] is True and status[f"{schema}.fresh"]["last_status"] == "success"


def test_history_pages_and_filters(api: TestClient, settings: Settings, pg: psycopg.Connection[Any]) -> None:
    schema = settings.schema_name
    for i in range(5):
        audit(pg, schema, "a", "success" if i % 2 else "failed", i)
    audit(pg, schema, "b", "success", 0)
    page = api.get("/history", params={"table": "a", "limit": 2}).json()
    assert len(page["items"]) == 2 and page["next_offset"] == 2
    rest = api.get("/history", params={"table": "a", "limit": 2, "offset": 4}).json()
    assert len(rest["items"]) == 1 and rest["next_offset"] is None
    failed = api.get("/history", params={"status": "failed"}).json()["items"]
    assert {r["table_name"] for r in failed} == {"a"} and len(failed) == 3


def test_metrics_json_and_prometheus(api: TestClient, settings: Settings, pg: psycopg.Connection[Any]) -> None:
    schema = settings.schema_name
    register_table(pg, schema, "a", SPEC)
    audit(pg, schema, "a", "success", 1)
    audit(pg, schema, "a", "failed", 0.5)
    m = api.get("/metrics").json()
    assert m[0]["runs"] == 2 and m[0]["success_rate"] == 0.5 and m[0]["rows_inserted"] == 8
    text = api.get("/metrics/prometheus").text
    assert f'bq_refresh_success_rate{{table="{schema}.a"}} 0.5' in text
    assert f'bq_refresh_rows_total{{table="{schema}.a",kind="deleted"}} 2' in text
    assert "# TYPE bq_refresh_seconds_since_last_success gauge" in text


def test_config_writes_need_the_token_and_valid_bodies(api: TestClient, settings: Settings,
                                                       pg: psycopg.Connection[Any]) -> None:
    schema = settings.schema_name
    register_table(pg, schema, "a", SPEC)
    assert api.put("/config", json={"table": "a", "priority": 5}).status_code == 401
    wrong = api.put("/config", json={"table": "a", "priority": 5}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    bad = api.put("/config", json={"table": "a", "priority": "high"}, headers=auth)
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "priority"]
    bad_params = api.put("/config", json={"table": "a", "custom_sync_params": {"batch_sise": 5}}, headers=auth)
    assert bad_params.status_code == 422 and "batch_sise" in json.dumps(bad_params.json())
    assert api.put("/config", json={"table": "nope", "priority": 1}, headers=auth).status_code == 404
    ok = api.put("/config", json={"table": "a", "priority": 5, "custom_sync_params": {"lookback": "2d"}}, headers=auth)
    assert ok.status_code == 200 and ok.json()["custom_sync_params"]["lookback"] == "2d"
    assert [c["priority"] for c in api.get("/config").json()] == [5]
    assert TOKEN not in json.dumps(api.get("/config").json())
    assert api.get("/openapi.json").json()["paths"].keys() >= {"/health", "/status", "/history", "/metrics",
                                                             "/metrics/prometheus", "/config", "/trigger"}


def test_reads_can_require_the_token(settings: Settings, pg: psycopg.Connection[Any]) -> None:
    from pydantic import SecretStr

    apply_migrations(pg, settings.schema_name)
    client = TestClient(create_app(settings.model_copy(update={"api_token": SecretStr(TOKEN),
                                                                "api_read_requires_token": True})))
    assert client.get("/status").status_code == 401
    assert client.get("/status", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


@pytest.mark.emulator
@pytest.mark.once
@pytest.mark.usefixtures("prefect_harness")
def test_trigger_starts_a_run_whose_result_shows_in_history(api: TestClient, env: Settings,
                                                            pg: psycopg.Connection[Any]) -> None:
    from blocks import BigQuerySource
    from tests.bqdata import put_table
    from tests.test_engine import SQP_KEY, SQP_SCHEMA, sqp_rows

    put_table(BigQuerySource.from_settings(env), "sqp", SQP_SCHEMA, sqp_rows(12))
    register_table(pg, env.schema_name, "t", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})
    assert api.post("/trigger", json={"tables": ["t"]}).status_code == 401
    started = api.post("/trigger", json={"tables": ["t"]}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert started.status_code == 202 and started.json()["mode"] == "local"
    deadline = time.monotonic() + 120
    items: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        items = api.get("/history", params={"table": "t", "status": "success"}).json()["items"]
        if items:
            break
        time.sleep(0.5)
    assert items and items[0]["rows_inserted"] == 12


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_operator_commands_end_to_end(settings: Settings, pg: psycopg.Connection[Any], tmp_path: Path) -> None:
    schema = settings.schema_name
    assert settings.database_url is not None
    env = {**os.environ, "BQ_REFRESH_DATABASE_URL": settings.database_url.get_secret_value(),
           "BQ_REFRESH_SCHEMA": schema, "BQ_REFRESH_STATE_DIR": str(tmp_path)}
    assert cli("init", env=env).returncode == 0
    register_table(pg, schema, "a", SPEC)
    register_table(pg, schema, "b", SPEC)
    assert cli("tables", "set", "b", "--priority", "7", "--frequency-hours", "12", "--depends-on", "a",
               "--params", '{"lookback": "3d"}', env=env).returncode == 0
    shown = json.loads(cli("tables", "show", "b", "--json", env=env).stdout)
    assert shown["priority"] == 7 and shown["frequency_hours"] == 12 and shown["params"]["lookback"] == "3d"
    assert shown["dependencies"] == [{"parent": f"{schema}.a", "dependent": f"{schema}.b", "kind": "hard"}]
    bad = cli("tables", "set", "b", "--params", '{"mode": "sideways"}', env=env)
    assert bad.returncode == 2 and "mode" in bad.stderr and "Traceback" not in bad.stderr  # configuration

    audit(pg, schema, "a", "failed", 1, "boom")
    status = json.loads(cli("status", "--json", env=env).stdout)
    assert {s["table"]: s["healthy"] for s in status} == {f"{schema}.a": False, f"{schema}.b": False}
    hist = json.loads(cli("history", "--table", "a", "--json", env=env).stdout)
    assert hist[0]["error_message"] == "boom"

    pg.execute(f'INSERT INTO "{schema}".refresh_checkpoints (function_name, table_schema, table_name,'
               " checkpoint_data, status) VALUES ('refresh_table', %s, 'a', '{}', 'active')", (schema,))
    assert len(json.loads(cli("checkpoints", "list", "--json", env=env).stdout)) == 1
    rolled = cli("rollback", "--yes", env=env)
    assert rolled.returncode == 0 and "2 table(s) disabled, 1 checkpoint(s) expired" in rolled.stdout
    assert cli("tables", "enable", "a", env=env).returncode == 0
    assert cli("tables", "remove", "b", env=env).returncode == 0
    listed = json.loads(cli("tables", "list", "--json", env=env).stdout)
    assert [(t["table"], t["enabled"]) for t in listed] == [(f"{schema}.a", True)]
    missing = cli("tables", "show", "nope", env=env)
    assert missing.returncode == 2 and "not registered" in missing.stderr


@pytest.mark.emulator
@pytest.mark.once
@pytest.mark.usefixtures("prefect_harness")
def test_cli_run_shows_results_and_exits_1_when_a_table_failed(env: Settings, pg: psycopg.Connection[Any],
                                                               tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    from blocks import BigQuerySource
    from tests.bqdata import put_table
    from tests.test_engine import SQP_KEY, SQP_SCHEMA, sqp_rows

    apply_migrations(pg, env.schema_name)
    put_table(BigQuerySource.from_settings(env), "sqp", SQP_SCHEMA, sqp_rows(15))
    register_table(pg, env.schema_name, "good", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})
    register_table(pg, env.schema_name, "bad", {"source": "nope", "key": SQP_KEY, "cursor": "updated_at"})
    child = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "COLUMNS": "200"}
    ok = cli("run", "--table", "good", env=child)
    assert ok.returncode == 0, ok.stderr
    assert "success" in ok.stdout and "15" in ok.stdout
    failed = cli("run", "--table", "good", "--table", "bad", "--json", env=child)
    assert failed.returncode == 1
    assert f"error: 1 table(s) failed: {env.schema_name}.bad" in failed.stderr
    summary = json.loads(failed.stdout)
    assert summary["failed"] == [f"{env.schema_name}.bad"]


@pytest.mark.once
@pytest.mark.usefixtures("prefect_harness")
def test_trigger_goes_through_the_prefect_api_when_a_deployment_is_configured(settings: Settings,
                                                                              pg: psycopg.Connection[Any]) -> None:
    from prefect import get_client
    from pydantic import SecretStr

    from flows.daily_refresh import daily_refresh

    apply_migrations(pg, settings.schema_name)
    deployment_id = daily_refresh.to_deployment(name="api-trigger-test").apply()
    client = TestClient(create_app(settings.model_copy(update={
        "api_token": SecretStr(TOKEN), "trigger_deployment": "daily-refresh/api-trigger-test"})))
    started = client.post("/trigger", json={"tables": ["a"], "dry_run": True},
                          headers={"Authorization": f"Bearer {TOKEN}"})
    assert started.status_code == 202 and started.json()["mode"] == "deployment"

    async def read() -> Any:
        async with get_client() as c:
            return await c.read_flow_run(started.json()["flow_run_id"])

    import asyncio

    run = asyncio.run(read())
    assert run.deployment_id == deployment_id
    assert run.parameters["tables"] == ["a"] and run.parameters["dry_run"] is True
