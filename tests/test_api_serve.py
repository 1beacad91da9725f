"""`bq-refresh serve` as a real process, as production runs it: triggers over HTTP start runs in it on one temporary
Prefect server (never two, however many triggers arrive at once), their run ids report each table's outcome after
the server is gone, and SIGTERM stops what serve started, closing the record of a run it will not finish."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import pytest
from pydantic import SecretStr

from blocks import BigQuerySource
from bq_refresh.services import free_port
from bq_refresh.settings import Settings
from flows.api import create_app
from tasks.migrations import apply_migrations
from tasks.registry import register_table
from tests.bqdata import put_table
from tests.conftest import ROOT
from tests.test_api import AUTH, TOKEN, served, wait_for_run
from tests.test_engine import SQP_KEY, SQP_SCHEMA, sqp_rows

PREFECT_SERVER = "prefect.server.api.server:create_app"  # the temporary server's uvicorn command line


class Serve:
    """A `bq-refresh serve` process on a free port of this machine, and an HTTP client for it."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.log = log.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--port", str(self.port)], cwd=ROOT,
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)
        deadline = time.monotonic() + 90
        while True:
            assert self.proc.poll() is None, f"serve exited: {log.read_text()[-3000:]}"
            try:
                if self.http.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"serve did not answer: {log.read_text()[-3000:]}"
            time.sleep(0.2)

    def prefect_servers(self) -> list[psutil.Process]:
        """The Prefect API servers this serve process started (its children running Prefect's server app)."""
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [c for c in children if PREFECT_SERVER in " ".join(_cmdline(c))]

    def stop(self) -> None:
        """SIGTERM (it stops its Prefect server), else SIGKILL and whatever it left behind."""
        left = self.prefect_servers()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        for child in left:
            if child.is_running():
                child.kill()
        self.http.close()
        self.log.close()


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


@pytest.fixture
def serve_env(env: Settings) -> dict[str, str]:
    """The test's settings for a serve process, with no Prefect API configured: runs need a temporary one."""
    child = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {**child, "REFRESH_API_TOKEN": TOKEN}


@pytest.fixture
def serve(serve_env: dict[str, str], tmp_path: Path) -> Iterator[Serve]:
    process = Serve(serve_env, tmp_path / "serve.log")
    yield process
    process.stop()


@pytest.mark.slow
@pytest.mark.emulator
@pytest.mark.once
@pytest.mark.second  # run in the second pass (pyproject.toml markers)
def test_serve_runs_concurrent_triggers_on_one_prefect_server_and_stops_it_on_sigterm(
    serve: Serve, env: Settings, pg: psycopg.Connection[Any], tmp_path: Path,
) -> None:
    schema = env.schema_name
    apply_migrations(pg, schema)
    put_table(BigQuerySource.from_settings(env), "sqp", SQP_SCHEMA, sqp_rows(20))
    for name in ("a", "b"):
        register_table(pg, schema, name, {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})
    assert serve.prefect_servers() == []  # started by the first run, not before

    answers: dict[str, httpx.Response] = {}

    def trigger(table: str, path: str) -> None:
        answers[table] = serve.http.post(path, json={"tables": [table]}, headers=AUTH)

    threads = [threading.Thread(target=trigger, args=("a", "/trigger")),
               threading.Thread(target=trigger, args=("b", "/api/refresh/trigger"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [answers[t].status_code for t in ("a", "b")] == [202, 202], {t: r.text for t, r in answers.items()}
    ids = {t: answers[t].json()["run_id"] for t in ("a", "b")}
    # A temporary Prefect server takes seconds to start: both runs are still in progress now.
    active = {r["run_id"]: r for r in serve.http.get("/status").json()["runs"]}
    assert set(active) == set(ids.values()) and {r["status"] for r in active.values()} <= {"queued", "running"}
    assert {r["tables"][0]["table"] for r in active.values()} == {f"{schema}.a", f"{schema}.b"}

    servers_seen: set[int] = set()
    runs = {}
    for table, run_id in ids.items():
        deadline = time.monotonic() + 240
        while True:
            servers_seen |= {p.pid for p in serve.prefect_servers()}
            run = serve.http.get(f"/runs/{run_id}").json()
            if run["status"] not in {"queued", "running"} or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        runs[table] = run
    for table, run in runs.items():
        assert run["status"] == "success", (run, (tmp_path / "serve.log").read_text()[-4000:])
        [outcome] = run["tables"]
        assert outcome["table"] == f"{schema}.{table}" and outcome["status"] == "success"
        assert outcome["rows_read"] == 20 and outcome["rows_inserted"] == 20
        assert run["started_at"] <= run["finished_at"] and run["flow_run_id"]
        assert pg.execute(f'SELECT count(*) FROM "{schema}"."{table}"').fetchone() == (20,)
    [server] = serve.prefect_servers()
    assert servers_seen == {server.pid}, "one temporary Prefect server for both runs"

    # A run still going when SIGTERM arrives: serve stops its Prefect server and says the run was interrupted.
    third = serve.http.post("/trigger", json={"tables": ["a"], "full_refresh": True}, headers=AUTH).json()["run_id"]
    serve.proc.send_signal(signal.SIGTERM)
    code = serve.proc.wait(60)
    assert code in (0, -signal.SIGTERM), code
    assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log, log[-4000:]

    # The records outlive serve and its temporary Prefect server.
    with served(create_app(env.model_copy(update={"api_token": SecretStr(TOKEN)}))) as api:
        assert wait_for_run(api, ids["a"]) == runs["a"]
        interrupted = api.get(f"/runs/{third}").json()
        assert interrupted["status"] == "interrupted" and "SIGTERM" in interrupted["error"], interrupted
        assert api.get("/status").json()["runs"] == []
