"""Deployments as users run them: prefect.yaml checked, automations saved, and a real Prefect server
with a process worker running a parameterized refresh-table (slow)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from blocks import BigQuerySource
from bq_refresh.services import free_port
from bq_refresh.settings import Settings
from tasks.migrations import apply_migrations
from tasks.registry import register_table
from tests.bqdata import put_table
from tests.conftest import ROOT
from tests.test_engine import SQP_KEY, SQP_SCHEMA, sqp_rows


def deployments() -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}


@pytest.mark.once
def test_schedules_and_limits() -> None:
    d = deployments()
    assert d["daily-refresh"]["schedules"] == [{"cron": "0 2 * * *", "timezone": "UTC", "active": True}]
    assert d["daily-refresh"]["concurrency_limit"] == 1
    assert d["maintenance"]["schedules"][0]["cron"] == "0 3 * * 0"
    assert d["refresh-table"].get("schedules") is None
    assert d["daily-refresh"]["work_pool"]["name"] == "bq-refresh-docker"
    assert d["refresh-table-process"]["work_pool"]["name"] == "bq-refresh-process"


@pytest.mark.once
@pytest.mark.usefixtures("prefect_harness")
def test_failure_automation_is_saved_with_a_webhook_block() -> None:
    from prefect.automations import Automation
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    from flows.automations import AUTOMATION_NAME, apply_failure_automation

    CustomWebhookNotificationBlock(name="ops", url="http://127.0.0.1:9/hook",
                                   json_data={"text": "{{body}}"}).save("bq-refresh-alerts", overwrite=True)
    first = apply_failure_automation("custom-webhook/bq-refresh-alerts")
    second = apply_failure_automation("custom-webhook/bq-refresh-alerts")  # replaces, never duplicates
    saved = Automation.read(name=AUTOMATION_NAME)
    assert isinstance(saved, Automation) and saved.id == second != first
    assert saved.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}  # type: ignore[union-attr]


def _prefect(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(Path(sys.executable).parent / "prefect"), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"prefect {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
@pytest.mark.emulator
@pytest.mark.once  # about Prefect, not the database: the PostgreSQL 15 pass skips it
def test_prefect_deploy_all_then_a_parameterized_run_on_a_process_worker(
    env: Settings, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    apply_migrations(pg, env.schema_name)
    source = BigQuerySource.from_settings(env)
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(25))
    register_table(pg, env.schema_name, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    penv = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
            "BQ_REFRESH_HOME": str(ROOT), "PREFECT_SERVER_API_PORT": str(port)}
    penv.pop("PREFECT_PROFILES_PATH", None)
    server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], cwd=ROOT, env=penv, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    worker = None
    try:
        import httpx

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise AssertionError("the Prefect server did not start")
        for pool, kind in (("bq-refresh-process", "process"), ("bq-refresh-docker", "docker")):
            _prefect("work-pool", "create", pool, "--type", kind, "--overwrite", env=penv)
        out = _prefect("--no-prompt", "deploy", "--all", env=penv, timeout=300)
        assert out.stdout.count("successfully created") == len(deployments()), out.stdout
        for name in ("daily-refresh/daily-refresh", "refresh-table/refresh-table-process", "maintenance/maintenance"):
            _prefect("deployment", "inspect", name, env=penv)

        run = _prefect("deployment", "run", "refresh-table/refresh-table-process", "-p", "table=sqp",
                       "-p", "dry_run=false", env=penv)
        assert "Created flow run" in run.stdout
        worker = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool",
                                   "bq-refresh-process", "--run-once"], cwd=ROOT, env=penv,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        worker.wait(timeout=300)
        rows = pg.execute(f'SELECT count(*) FROM "{env.schema_name}".sqp').fetchone()
        audit = pg.execute(f'SELECT status FROM "{env.schema_name}".refresh_audit_log').fetchall()
        assert rows == (25,) and audit == [("success",)]

        # Scale-out: the parent starts each table as a flow run of the refresh-table deployment.
        put_table(source, "sqp", SQP_SCHEMA, sqp_rows(40))
        _prefect("deployment", "run", "daily-refresh/daily-refresh-process", "-p", "use_deployments=true",
                 "-p", "force=true", "-p", "table_deployment=refresh-table/refresh-table-process", env=penv)
        worker = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool",
                                   "bq-refresh-process", "--limit", "4"], cwd=ROOT, env=penv,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            count = pg.execute(f'SELECT count(*) FROM "{env.schema_name}".sqp').fetchone()
            if count == (40,):
                break
            time.sleep(1)
        assert pg.execute(f'SELECT count(*) FROM "{env.schema_name}".sqp').fetchone() == (40,)
        flows = _prefect("flow-run", "ls", env={**penv, "COLUMNS": "250"}).stdout
        assert "daily-refresh" in flows and flows.count("refresh-table") >= 2
    finally:
        for proc in (worker, server):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, 15)
                proc.wait(timeout=30)
