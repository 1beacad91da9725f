"""The HTTP API over real HTTP (uvicorn in this process) against a real PostgreSQL, and the operator CLI end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from bq_refresh.services import free_port
from bq_refresh.settings import Settings
from flows.api import create_app
from tasks import metrics as metrics_q
from tasks import runs as runs_q
from tasks.maintenance import archive_audit
from tasks.migrations import apply_migrations
from tasks.registry import register_table
from tests.conftest import ROOT

TOKEN = "api-token-s3cr3t-9d2"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SPEC = {"source": "sqp", "key": ["id"], "cursor": "updated_at"}


def audit(pg: psycopg.Connection[Any], schema: str, table: str, status: str, hours_ago: float, error: str | None = None) -> None:
    pg.execute(
        f'INSERT INTO "{schema}".refresh_audit_log (table_schema, table_name, refresh_started_at, refresh_completed_at,'
        " status, rows_processed, rows_inserted, rows_updated, rows_deleted, execution_time_ms, error_message)"
        " VALUES (%s, %s, now() - make_interval(secs => %s), now() - make_interval(secs => %s), %s, 10, 4, 3, 1, 1500, %s)",
        (schema, table, hours_ago * 3600 + 2, hours_ago * 3600, status, error),
    )


@contextmanager
def served(app: Any) -> Iterator[httpx.Client]:
    """``app`` served by uvicorn on a free port of this machine, and a client for it (real HTTP)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.config.port}", timeout=60) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(15)


@pytest.fixture
def api(settings: Settings, pg: psycopg.Connection[Any]) -> Iterator[httpx.Client]:
    apply_migrations(pg, settings.schema_name)
    with served(create_app(settings.model_copy(update={"api_token": SecretStr(TOKEN)}))) as client:
        yield client


def test_health_turns_503_naming_stale_and_failed_tables(api: httpx.Client, settings: Settings,
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
    assert api.get("/healthz").json() == {"status": "ok", "database": "ok", "runs_in_this_process": 0}

    audit(pg, schema, "stale", "success", 0.1)
    audit(pg, schema, "broken", "success", 0.1)
    healthy = api.get("/health")
    assert healthy.status_code == 200 and healthy.json()["tables_enabled"] == 3

    raw = api.get("/status")
    assert raw.status_code == 200, raw.text
    assert raw.json() == api.get("/api/refresh/status").json()
    status = {r["table"]: r for r in raw.json()["tables"]}
    assert status[f"{schema}.off"]["healthy"] is True and status[f"{schema}.fresh"]["last_status"] == "success"
    assert raw.json()["in_progress"] == [] and raw.json()["runs"] == []


def test_history_pages_and_filters(api: httpx.Client, settings: Settings, pg: psycopg.Connection[Any]) -> None:
    schema = settings.schema_name
    for i in range(5):
        audit(pg, schema, "a", "success" if i % 2 else "failed", i)
    audit(pg, schema, "b", "success", 0)
    page = api.get("/history", params={"table": "a", "limit": 2}).json()
    assert len(page["items"]) == 2 and page["next_offset"] == 2
    assert api.get("/api/refresh/history", params={"table": "a", "limit": 2}).json() == page
    rest = api.get("/history", params={"table": "a", "limit": 2, "offset": 4}).json()
    assert len(rest["items"]) == 1 and rest["next_offset"] is None
    failed = api.get("/history", params={"status": "failed"}).json()["items"]
    assert {r["table_name"] for r in failed} == {"a"} and len(failed) == 3
    assert api.get("/history", params={"limit": 0}).status_code == 422


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text parsed by prometheus_client: (sample name, labels) -> value; also checks every family's
    type against its name (counters end in _total, gauges do not)."""
    out = {}
    for family in text_string_to_metric_families(text):
        assert family.type in {"counter", "gauge"}, family
        for s in family.samples:
            if family.type == "counter" and s.name.endswith("_created"):
                continue
            assert s.name.endswith("_total") == (family.type == "counter"), s.name
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_counters_outlive_the_audit_archive_and_gauges_cover_30_days(
        api: httpx.Client, settings: Settings, pg: psycopg.Connection[Any]) -> None:
    schema = settings.schema_name
    a = f"{schema}.a"
    register_table(pg, schema, "a", SPEC)
    audit(pg, schema, "a", "success", 24 * 200)  # archived below: counted in the totals, not in the 30 days
    audit(pg, schema, "a", "success", 1)
    audit(pg, schema, "a", "failed", 0.5)
    pg.execute(f'INSERT INTO "{schema}".refresh_audit_log (table_schema, table_name, refresh_started_at, status,'
               " sync_metadata) VALUES (%s, 'a', now(), 'running', '{\"dry_run\": true}')", (schema,))
    pg.execute(f'UPDATE "{schema}".refresh_audit_log SET status = \'success\', rows_inserted = 1000'
               " WHERE status = 'running'")  # a dry run publishes nothing: not counted
    pg.execute(f'UPDATE "{schema}".refresh_audit_log SET status = \'failed\' WHERE refresh_started_at'
               " < now() - interval '1 hour' AND refresh_started_at > now() - interval '2 hours'")  # a view failed later

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        response = api.get("/metrics")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        parsed = samples(response.text)
        moving = "bq_refresh_seconds_since_last_success"
        assert ({k: v for k, v in parsed.items() if k[0] != moving}
                == {k: v for k, v in samples(api.get("/api/refresh/metrics").text).items() if k[0] != moving})
        return parsed

    def counters(m: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, float]:
        return {f"{name}{dict(labels).get('kind', '')}": v for (name, labels), v in m.items()
                if name.endswith("_total") and dict(labels).get("table") == a}

    before = scrape()
    expected = {"bq_refresh_runs_total": 3, "bq_refresh_successes_total": 2, "bq_refresh_failures_total": 2,
                "bq_refresh_skipped_total": 0, "bq_refresh_rows_totalread": 30, "bq_refresh_rows_totalinserted": 12,
                "bq_refresh_rows_totalupdated": 9, "bq_refresh_rows_totaldeleted": 3, "bq_refresh_run_seconds_total": 4.5}
    assert counters(before) == expected
    label = (("table", a),)
    assert before[("bq_refresh_runs_30d", label)] == 2 and before[("bq_refresh_success_rate_30d", label)] == 0.0
    assert before[("bq_refresh_failures_30d", label)] == 2
    assert 3600 < before[("bq_refresh_seconds_since_last_success", label)] < 3700  # it published, then a view failed
    assert before[("bq_refresh_tables_in_progress", ())] == 0

    moved = archive_audit(pg, schema, retention_days=90)
    assert moved.audit == 1
    pg.execute(f'DELETE FROM "{schema}".refresh_audit_log')  # even a purge by hand takes nothing away
    after = scrape()
    assert counters(after) == expected
    assert after[("bq_refresh_runs_30d", label)] == 0

    audit(pg, schema, "a", "success", 0)
    grown = counters(scrape())
    assert grown["bq_refresh_runs_total"] == 4 and grown["bq_refresh_rows_totalinserted"] == 16
    assert all(grown[k] >= v for k, v in expected.items())

    as_json = api.get("/metrics", headers={"Accept": "application/json"})
    assert as_json.headers["content-type"] == "application/json"
    row = as_json.json()[0]
    assert row["table"] == a and row["runs"] == 1 and row["totals"]["runs"] == 4 and row["totals"]["failures"] == 2
    assert "bq_refresh_runs_total" in api.get("/metrics/prometheus").text


def test_totals_are_seeded_from_the_audit_log_and_its_archive_on_upgrade(settings: Settings,
                                                                         pg: psycopg.Connection[Any]) -> None:
    """An install from before migration 009: its history, live and archived, becomes the counters' start."""
    schema = settings.schema_name
    s = f'"{schema}"'
    apply_migrations(pg, schema)
    pg.execute(f"DROP TRIGGER refresh_count_totals ON {s}.refresh_audit_log")  # as before 009
    pg.execute(f"DROP TABLE {s}.refresh_totals, {s}.refresh_runs")
    pg.execute(f"DELETE FROM {s}.schema_migrations WHERE version = 9")
    audit(pg, schema, "a", "success", 24 * 100)
    audit(pg, schema, "a", "failed", 24 * 100)
    audit(pg, schema, "a", "skipped", 2)
    audit(pg, schema, "b", "success", 1)
    pg.execute(f"INSERT INTO {s}.refresh_audit_log (table_schema, table_name, refresh_started_at, status)"
               " VALUES (%s, 'b', now(), 'running')", (schema,))
    assert archive_audit(pg, schema, retention_days=90).audit == 2
    assert apply_migrations(pg, schema).applied == ["009_runs.sql"]
    totals = {r["table"]: r for r in metrics_q.totals(pg, schema)}
    a, b = totals[f"{schema}.a"], totals[f"{schema}.b"]
    assert (a["runs"], a["successes"], a["failures"], a["skipped"], a["rows_inserted"]) == (2, 1, 1, 1, 12)
    assert (b["runs"], b["successes"], b["failures"], b["rows_read"], b["run_seconds"]) == (1, 1, 0, 10, 1.5)
    pg.execute(f"UPDATE {s}.refresh_audit_log SET status = 'success', rows_processed = 5 WHERE status = 'running'")
    assert [r["runs"] for r in metrics_q.totals(pg, schema) if r["table"] == f"{schema}.b"] == [2]


def test_config_writes_need_the_token_and_valid_bodies(api: httpx.Client, settings: Settings,
                                                       pg: psycopg.Connection[Any]) -> None:
    schema = settings.schema_name
    register_table(pg, schema, "a", SPEC)
    assert api.put("/config", json={"table": "a", "priority": 5}).status_code == 401
    wrong = api.put("/config", json={"table": "a", "priority": 5}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    bad = api.put("/config", json={"table": "a", "priority": "high"}, headers=AUTH)
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "priority"]
    bad_params = api.put("/config", json={"table": "a", "custom_sync_params": {"batch_sise": 5}}, headers=AUTH)
    assert bad_params.status_code == 422 and "batch_sise" in json.dumps(bad_params.json())
    assert api.put("/config", json={"table": "nope", "priority": 1}, headers=AUTH).status_code == 404
    ok = api.put("/config", json={"table": "a", "priority": 5, "custom_sync_params": {"lookback": "2d"}}, headers=AUTH)
    assert ok.status_code == 200 and ok.json()["custom_sync_params"]["lookback"] == "2d"
    assert api.put("/api/refresh/config", json={"table": "a", "priority": 6}, headers=AUTH).json()["priority"] == 6
    assert [c["priority"] for c in api.get("/config").json()] == [6] == [c["priority"] for c in
                                                                         api.get("/api/refresh/config").json()]
    assert TOKEN not in json.dumps(api.get("/config").json())


def test_openapi_declares_the_bearer_scheme_errors_and_aliases(api: httpx.Client) -> None:
    doc = api.get("/openapi.json").json()
    paths = doc["paths"]
    native = {"/status", "/trigger", "/history", "/metrics", "/config"}
    assert paths.keys() >= {"/health", "/healthz", "/runs/{run_id}", "/metrics/prometheus"} | native
    for path in native:  # the earlier attempt's paths, with the same bodies
        alias = paths[f"/api/refresh{path}"]
        assert alias.keys() == paths[path].keys()
        for method, op in alias.items():
            assert op["tags"] == ["earlier attempt's paths"]
            assert op["responses"].keys() == paths[path][method]["responses"].keys()
            assert op.get("requestBody") == paths[path][method].get("requestBody")
    assert doc["components"]["securitySchemes"] == {"bearer": {
        "type": "http", "scheme": "bearer",
        "description": "The API token (REFRESH_API_TOKEN), sent as 'Authorization: Bearer <token>'."}}
    trigger = paths["/trigger"]["post"]
    assert trigger["security"] == [{"bearer": []}]
    assert {"202", "401", "404", "422", "503"} <= trigger["responses"].keys()
    assert trigger["responses"]["404"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    assert {"200", "404", "422", "503"} <= paths["/runs/{run_id}"]["get"]["responses"].keys()
    assert "security" not in paths["/status"]["get"]  # reads are open unless REFRESH_API_READ_REQUIRES_TOKEN
    assert paths["/metrics"]["get"]["responses"]["200"]["content"].keys() == {"text/plain", "application/json"}
    assert paths["/metrics/prometheus"]["get"]["deprecated"] is True
    # The docs pages use the assets served here, never a CDN.
    for page, assets in {"/docs": ("/static/swagger-ui-bundle.js", "/static/swagger-ui.css"),
                         "/redoc": ("/static/redoc.standalone.js",)}.items():
        html = api.get(page).text
        assert "https://" not in html and "http://" not in html, html
        for asset in assets:
            assert asset in html and api.get(asset).status_code == 200 and len(api.get(asset).content) > 100_000


def dockerfile_stage(name: str) -> list[str]:
    """The lines of one stage of the Dockerfile (``FROM ... AS name`` up to the next FROM)."""
    lines = (ROOT / "Dockerfile").read_text().replace("\\\n", "").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("FROM ") and line.endswith(f" AS {name}"))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("FROM ")), len(lines))
    return lines[start:end]


def test_healthz_and_the_images_health_check_say_whether_the_database_answers(settings: Settings,
                                                                             pg: psycopg.Connection[Any]) -> None:
    """The image's api target serves the API with a HEALTHCHECK on /healthz: run here as the image would, against
    an API that reaches PostgreSQL (exit 0) and one that does not (503, exit 1)."""
    stage = dockerfile_stage("api")
    assert json.loads(next(line for line in stage if line.startswith("CMD "))[4:]) == [
        "bq-refresh", "serve", "--host", "0.0.0.0", "--port", "8080"]
    check = next(line for line in stage if line.startswith("HEALTHCHECK "))
    command = json.loads(check.split(" CMD ", 1)[1])
    assert command[0] == "python"
    apply_migrations(pg, settings.schema_name)
    down = settings.model_copy(update={"database_url": SecretStr(f"postgresql://nobody@127.0.0.1:{free_port()}/x")})
    for cfg, status, code in ((settings, 200, 0), (down, 503, 1)):
        with served(create_app(cfg)) as api:
            assert api.get("/healthz").status_code == status
            port = api.base_url.port
            probe = [sys.executable, *(arg.replace(":8080/", f":{port}/") for arg in command[1:])]
            assert subprocess.run(probe, capture_output=True, timeout=30).returncode == code
            if status == 503:
                refused = api.get("/status")
                assert refused.status_code == 503 and refused.json()["detail"].startswith("database unreachable")


def test_reads_can_require_the_token(settings: Settings, pg: psycopg.Connection[Any]) -> None:
    apply_migrations(pg, settings.schema_name)
    with served(create_app(settings.model_copy(update={"api_token": SecretStr(TOKEN),
                                                       "api_read_requires_token": True}))) as client:
        assert client.get("/status").status_code == 401
        assert client.get("/api/refresh/metrics").status_code == 401
        assert client.get("/status", headers=AUTH).status_code == 200
        assert client.get("/healthz").status_code == 200  # an orchestrator's probe has no token
        assert client.get("/openapi.json").json()["paths"]["/status"]["get"]["security"] == [{"bearer": []}]


def test_status_and_runs_show_phase_and_rows_staged_of_expected(api: httpx.Client, settings: Settings,
                                                                pg: psycopg.Connection[Any]) -> None:
    """A table run in progress as it goes: planning, reading (rows staged of the read session's estimate),
    checking, publishing; a run record whose serve process stopped beating is interrupted."""
    schema = settings.schema_name
    s = f'"{schema}"'
    register_table(pg, schema, "a", SPEC)
    register_table(pg, schema, "b", SPEC)
    run_id = runs_q.create_run(pg, schema, mode="local", parameters={"tables": ["a", "b"]},
                               tables=[f"{schema}.a", f"{schema}.b"], served_by="elsewhere:1")
    runs_q.mark_running(pg, schema, run_id)
    pg.execute(f"UPDATE {s}.refresh_runs SET started_at = now() - interval '1 minute'")
    audit(pg, schema, "b", "success", 0)  # b finished since the run started
    row = pg.execute(f"INSERT INTO {s}.refresh_audit_log (table_schema, table_name, refresh_started_at, status)"
                     " VALUES (%s, 'a', clock_timestamp(), 'running') RETURNING id", (schema,)).fetchone()
    assert row is not None
    audit_id = row[0]

    def progress() -> dict[str, Any]:
        body = api.get("/status").json()
        [p] = body["in_progress"]
        assert p["table"] == f"{schema}.a" and p["audit_id"] == audit_id
        [r] = body["runs"]
        assert r["run_id"] == run_id and r["status"] == "running"
        same = api.get(f"/runs/{run_id}").json()
        for body in (r, same):
            for t in body["tables"]:
                t.pop("seconds", None)  # how long it has run: moves between the two answers
        assert r == same
        tables = {t["table"]: t for t in r["tables"]}
        assert tables[f"{schema}.b"]["status"] == "success" and tables[f"{schema}.b"]["rows_inserted"] == 4
        assert tables[f"{schema}.a"]["phase"] == p["phase"] and tables[f"{schema}.a"]["status"] == "running"
        return p

    assert progress()["phase"] == "planning"
    data = {"session": {"streams": ["s0", "s1"], "estimated_rows": 500}, "done": {"s0": True}, "unchanged": 30}
    pg.execute(f"INSERT INTO {s}.refresh_checkpoints (function_name, table_schema, table_name, checkpoint_data,"
               " last_processed_row, status) VALUES ('refresh_table', %s, 'a', %s, 120, 'active')",
               (schema, json.dumps(data)))
    p = progress()
    assert (p["phase"], p["rows_staged"], p["rows_unchanged"], p["rows_expected"]) == ("reading", 120, 30, 500)
    metrics = samples(api.get("/metrics").text)
    assert metrics[("bq_refresh_rows_staged", (("table", f"{schema}.a"),))] == 120
    assert metrics[("bq_refresh_rows_expected", (("table", f"{schema}.a"),))] == 500
    pg.execute(f"UPDATE {s}.refresh_checkpoints SET checkpoint_data = jsonb_set(checkpoint_data, '{{done,s1}}', 'true'),"
               " last_processed_row = 470")
    assert progress()["phase"] == "checking"
    pg.execute(f"INSERT INTO {s}.refresh_data_quality (audit_log_id, metric_name, is_within_threshold)"
               " VALUES (%s, 'row_count', true)", (audit_id,))
    assert progress()["phase"] == "publishing"
    pg.execute(f"UPDATE {s}.refresh_checkpoints SET status = 'completed'")
    assert progress()["phase"] == "finishing"

    pg.execute(f"UPDATE {s}.refresh_runs SET heartbeat_at = now() - interval '10 minutes'")
    gone = api.get(f"/runs/{run_id}").json()
    assert gone["status"] == "interrupted" and "stopped" in gone["error"] and gone["finished_at"]
    assert api.get("/status").json()["runs"] == []
    missing = api.get("/runs/00000000-0000-4000-8000-000000000000")
    assert missing.status_code == 404 and "no run" in missing.json()["detail"]
    assert api.get("/runs/not-a-uuid").status_code == 422


@pytest.mark.emulator
@pytest.mark.once
@pytest.mark.usefixtures("prefect_harness")
def test_trigger_answers_a_run_id_that_reports_the_outcome(api: httpx.Client, env: Settings,
                                                           pg: psycopg.Connection[Any]) -> None:
    from blocks import BigQuerySource
    from tests.bqdata import put_table
    from tests.test_engine import SQP_KEY, SQP_SCHEMA, sqp_rows

    put_table(BigQuerySource.from_settings(env), "sqp", SQP_SCHEMA, sqp_rows(12))
    register_table(pg, env.schema_name, "t", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})
    assert api.post("/trigger", json={"tables": ["t"]}).status_code == 401
    unknown = api.post("/trigger", json={"tables": ["t", "nope", "other.gone"]}, headers=AUTH)
    assert unknown.status_code == 404 and unknown.json()["detail"].startswith("not registered: nope, other.gone")
    assert api.post("/trigger", json={"tables": "t"}, headers=AUTH).status_code == 422
    started = api.post("/trigger", json={"tables": ["t"]}, headers=AUTH)
    assert started.status_code == 202, started.text
    answer = started.json()
    assert answer["mode"] == "local" and answer["tables"] == [f"{env.schema_name}.t"]
    assert answer["status_url"] == f"/runs/{answer['run_id']}"
    run = wait_for_run(api, answer["run_id"])
    assert run["status"] == "success" and run["started_at"] <= run["finished_at"], run
    [table] = run["tables"]
    assert table["table"] == f"{env.schema_name}.t" and table["status"] == "success" and table["rows_inserted"] == 12
    assert api.get("/history", params={"table": "t"}).json()["items"][0]["id"] == table["audit_id"]


def wait_for_run(api: httpx.Client, run_id: str, timeout_s: float = 180) -> dict[str, Any]:
    """GET /runs/{id} until the run ended."""
    deadline = time.monotonic() + timeout_s
    while True:
        run: dict[str, Any] = api.get(f"/runs/{run_id}").json()
        if run["status"] not in runs_q.ACTIVE or time.monotonic() > deadline:
            return run
        time.sleep(0.5)


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.once  # the operator's commands, not the server: the first pass only
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
    import asyncio

    from prefect import get_client
    from prefect.states import Completed

    from flows.daily_refresh import daily_refresh

    apply_migrations(pg, settings.schema_name)
    register_table(pg, settings.schema_name, "a", SPEC)
    deployment_id = daily_refresh.to_deployment(name="api-trigger-test").apply()
    with served(create_app(settings.model_copy(update={
            "api_token": SecretStr(TOKEN), "trigger_deployment": "daily-refresh/api-trigger-test"}))) as client:
        started = client.post("/api/refresh/trigger", json={"tables": ["a"], "dry_run": True}, headers=AUTH)
        assert started.status_code == 202, started.text
        answer = started.json()
        assert answer["mode"] == "deployment" and answer["deployment"] == "daily-refresh/api-trigger-test"

        async def read() -> Any:
            async with get_client() as c:
                return await c.read_flow_run(answer["flow_run_id"])

        run = asyncio.run(read())
        assert run.deployment_id == deployment_id
        assert run.parameters["tables"] == ["a"] and run.parameters["dry_run"] is True
        queued = client.get(f"/runs/{answer['run_id']}").json()
        assert queued["status"] == "queued" and queued["flow_run_id"] == answer["flow_run_id"]

        async def complete() -> None:  # what the worker would do
            async with get_client() as c:
                await c.set_flow_run_state(answer["flow_run_id"], Completed(), force=True)

        asyncio.run(complete())
        done = client.get(f"/runs/{answer['run_id']}").json()
        assert done["status"] == "success" and done["finished_at"], done
        assert done["tables"] == [{"table": f"{settings.schema_name}.a", "status": "not run"}]
