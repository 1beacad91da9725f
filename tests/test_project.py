"""The project as users get it: deployments that import, an image that builds from real paths, the CLI."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
import time
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
                    "--no-check", "--json", env=env)  # no BigQuery here: the source checks are tests/test_doctor.py's
    assert added.returncode == 0, added.stderr
    bad = run_cli("tables", "add", "sqp_y", "--source", "ds.t", "--key", "id", "--params", '{"batch_sise": 5}',
                  env=env)
    assert bad.returncode == 2  # configuration
    assert f"{schema}.sqp_y: invalid sync parameters: batch_sise" in bad.stderr
    assert "Traceback" not in bad.stderr
    listed = json.loads(run_cli("tables", "list", "--json", env=env).stdout)
    assert [t["table"] for t in listed] == [f"{schema}.sqp_x"]


INNER_TEST = '''
import os
import time
from pathlib import Path

import psycopg


def test_uses_the_embedded_server(pg_uri):
    with psycopg.connect(pg_uri) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    hold = os.environ.get("HOLD_UNTIL")  # stay in the session until told to end it
    if hold:
        Path(hold + ".ready").touch()
        deadline = time.monotonic() + 120
        while not Path(hold).exists():
            assert time.monotonic() < deadline
            time.sleep(0.1)
'''

# Another process on the same state folder, as a concurrent pytest or a demo would be: it takes a handle on
# the embedded server (starting it if none runs) and keeps it until the file named by argv[2] exists (without
# argv[2], it exits at once; the server keeps running).
HOLDER = '''
import sys
import time
from pathlib import Path

from bq_refresh.services import start_embedded_postgres

start_embedded_postgres(Path(sys.argv[1]))
print("holding", flush=True)
while len(sys.argv) > 2 and not Path(sys.argv[2]).exists():
    time.sleep(0.1)
'''


@pytest.mark.slow
@pytest.mark.once  # about the embedded server's lifetime, not the PostgreSQL version
def test_a_test_session_stops_the_embedded_postgres_it_started_and_only_that(tmp_path: Path) -> None:
    """pytest sessions on a state folder of their own (BQ_REFRESH_TEST_STATE_DIR): one that started the embedded
    server stops it at its end (no orphan postgres); one that found it running leaves it; one that started it
    while another process still holds it leaves it."""
    from bq_refresh.services import stop_embedded_postgres
    from tests.conftest import embedded_postgres_pids

    state, inner = tmp_path / "state", tmp_path / "inner"
    inner.mkdir()
    (inner / "conftest.py").write_text("from tests.conftest import pg_uri  # noqa: F401\n")
    (inner / "test_inner.py").write_text(INNER_TEST)
    env = {k: v for k, v in os.environ.items() if k not in {"BQ_REFRESH_DATABASE_URL", "PREFECT_API_URL"}}
    env |= {"BQ_REFRESH_TEST_STATE_DIR": str(state), "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect")}

    started: list[subprocess.Popen[str]] = []

    def session(hold_until: Path | None = None) -> subprocess.Popen[str]:
        extra = {"HOLD_UNTIL": str(hold_until)} if hold_until else {}
        started.append(subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                                         "no:bqemulator", str(inner)], cwd=inner, env=env | extra,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        return started[-1]

    def ended(proc: subprocess.Popen[str]) -> None:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out

    def holder(*release: Path) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(state), *map(str, release)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
        return proc

    def stopped() -> bool:  # a server told to stop takes a moment to leave the process table
        deadline = time.monotonic() + 10
        while embedded_postgres_pids(state) and time.monotonic() < deadline:
            time.sleep(0.1)
        return embedded_postgres_pids(state) == []

    def wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
        deadline = time.monotonic() + 120
        while not path.exists():
            assert proc.poll() is None and time.monotonic() < deadline, f"{path.name} never appeared"
            time.sleep(0.1)

    try:
        # 1. Nothing runs: the session starts the server and stops it at its end.
        ended(session())
        assert stopped(), f"postgres left running: {embedded_postgres_pids(state)}"

        # 2. Already running (started by another process that has exited): left running.
        ended(holder())  # takes its handle and exits at once
        running = embedded_postgres_pids(state)
        assert len(running) == 1
        ended(session())
        assert embedded_postgres_pids(state) == running
        assert stop_embedded_postgres(state) and stopped()

        # 3. The session starts it, another process takes a handle meanwhile: left running for that process.
        go, release = tmp_path / "go", tmp_path / "release"
        first = session(hold_until=go)
        wait_for(Path(f"{go}.ready"), first)
        running = embedded_postgres_pids(state)
        assert len(running) == 1
        other = holder(release)
        go.touch()
        ended(first)
        assert embedded_postgres_pids(state) == running
        release.touch()
        ended(other)
    finally:
        for proc in started:  # a failed step leaves no helper behind
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stop_embedded_postgres(state)
    assert stopped(), f"postgres left running: {embedded_postgres_pids(state)}"
