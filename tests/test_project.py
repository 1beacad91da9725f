"""The project as users get it: deployments that import, an image that builds from real paths, the CLI."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from tasks.migrations import load_migrations
from tests.conftest import ROOT


def load_deployments() -> list[dict[str, Any]]:
    return list(yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"])


@pytest.mark.parametrize("deployment", load_deployments(), ids=lambda d: d["name"])
def test_every_deployment_imports_and_its_parameters_match(deployment: dict[str, Any]) -> None:
    path, func = deployment["entrypoint"].split(":")
    spec = importlib.util.spec_from_file_location(f"entry_{func}", ROOT / path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    flow = getattr(module, func)
    signature = inspect.signature(flow.fn)
    unknown = set(deployment.get("parameters") or {}) - set(signature.parameters)
    assert not unknown, f"{deployment['name']}: parameters not in the flow signature: {unknown}"


def test_dockerfile_copies_paths_that_exist() -> None:
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    assert "USER bqrefresh" in (ROOT / "Dockerfile").read_text()


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_init_is_idempotent_and_errors_are_one_line(pg_uri: str, schema: str, tmp_path: Path,
                                                       pg: psycopg.Connection[Any]) -> None:
    env = {**os.environ, "BQ_REFRESH_DATABASE_URL": pg_uri, "BQ_REFRESH_SCHEMA": schema,
           "BQ_REFRESH_STATE_DIR": str(tmp_path)}
    first = run_cli("init", "--json", env=env)
    assert first.returncode == 0, first.stderr
    migrations = [m.name for m in load_migrations()]
    assert json.loads(first.stdout)["applied"] == migrations
    assert migrations[:5] == ["001_refresh_system.sql", "002_sync_state.sql", "003_alerts.sql",
                              "004_watermark_target.sql", "005_monitoring_and_archive.sql"]
    second = json.loads(run_cli("init", "--json", env=env).stdout)
    assert second["applied"] == [] and second["already_applied"] == migrations

    added = run_cli("tables", "add", "sqp_x", "--source", "ds.t", "--key", "id", "--cursor", "updated_at",
                    "--json", env=env)
    assert added.returncode == 0, added.stderr
    bad = run_cli("tables", "add", "sqp_y", "--source", "ds.t", "--key", "id", "--params", '{"batch_sise": 5}',
                  env=env)
    assert bad.returncode == 1
    assert f"{schema}.sqp_y: invalid sync parameters: batch_sise" in bad.stderr
    assert "Traceback" not in bad.stderr
    listed = json.loads(run_cli("tables", "list", "--json", env=env).stdout)
    assert [t["table"] for t in listed] == [f"{schema}.sqp_x"]
