"""Deployments as users run them: prefect.yaml checked, automations saved, and a real Prefect server with a
process worker (slow): the README's commands for a host without Docker, a parameterized refresh-table, the
scale-out, and a failing night with the failure automation applied (one notification per channel)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
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
from tests.conftest import ROOT, WebhookReceiver
from tests.test_engine import SQP_KEY, SQP_SCHEMA, sqp_rows


def deployments() -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}


@pytest.mark.once
@pytest.mark.second  # run in the second pass (pyproject.toml markers)
def test_schedules_and_limits() -> None:
    d = deployments()
    assert d["daily-refresh"]["schedules"] == [{"cron": "0 2 * * *", "timezone": "UTC", "active": True}]
    assert d["daily-refresh"]["concurrency_limit"] == 1
    assert d["maintenance"]["schedules"][0]["cron"] == "0 3 * * 0"
    assert d["refresh-table"].get("schedules") is None
    assert d["daily-refresh"]["work_pool"]["name"] == "bq-refresh-docker"
    # A process-only host has the same set: the nightly schedule active, maintenance, refresh-table.
    for name in ("daily-refresh", "refresh-table", "maintenance"):
        docker, process = d[name], d[f"{name}-process"]
        assert process["work_pool"]["name"] == "bq-refresh-process" and docker["work_pool"]["name"] == "bq-refresh-docker"
        assert (process["entrypoint"], process.get("schedules"), process.get("concurrency_limit")) == (
            docker["entrypoint"], docker.get("schedules"), docker.get("concurrency_limit"))


@pytest.mark.once
@pytest.mark.second  # run in the second pass (pyproject.toml markers)
@pytest.mark.usefixtures("prefect_harness")
def test_failure_automation_is_saved_with_a_webhook_block() -> None:
    from prefect.automations import Automation
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    from flows.automations import ALERTED_EVENT, AUTOMATION_NAME, apply_failure_automation

    CustomWebhookNotificationBlock(name="ops", url="http://127.0.0.1:9/hook",
                                   json_data={"text": "{{body}}"}).save("bq-refresh-alerts", overwrite=True)
    first = apply_failure_automation("custom-webhook/bq-refresh-alerts")
    second = apply_failure_automation("custom-webhook/bq-refresh-alerts")  # replaces, never duplicates
    saved = Automation.read(name=AUTOMATION_NAME)
    assert isinstance(saved, Automation) and saved.id == second != first
    trigger: Any = saved.trigger
    assert trigger.after == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    assert trigger.expect == {ALERTED_EVENT} and trigger.posture.value == "Proactive"




PREFECT = str(Path(sys.executable).parent / "prefect")
PROCESS_HOST = "On a host without Docker"


def readme_commands(after: str) -> list[str]:
    """The commands of the README's first bash block after the phrase ``after``, comments cut."""
    block = (ROOT / "README.md").read_text().split(after, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def _prefect(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([PREFECT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"prefect {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _until(what: str, done: Callable[[], bool], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if done():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


class PrefectServer:
    """``prefect server start`` on a free port with its own home (its services: triggers, actions). Not its
    scheduler: the deployments keep their active 02:00 UTC schedule, and a suite running at that hour saw the
    scheduled night start on a test's worker and alert beside the runs the test made (the tests start their runs)."""

    def __init__(self, home: Path) -> None:
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = {"PREFECT_HOME": str(home), "PREFECT_API_URL": self.api, "BQ_REFRESH_HOME": str(ROOT),
                    "PREFECT_SERVER_API_PORT": str(self.port), "COLUMNS": "250",
                    "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"}
        self.proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                                     cwd=ROOT, env=self.environ(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        import httpx

        def healthy() -> bool:
            try:
                return httpx.get(f"{self.api}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _until("the Prefect server", healthy, 180)

    def environ(self, **extra: str) -> dict[str, str]:
        """The process environment (with the test's settings) pointed at this server."""
        env = {**os.environ, **self.env, **extra}
        env.pop("PREFECT_PROFILES_PATH", None)
        return env

    def client(self) -> Any:
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        class Scoped:
            def __enter__(inner) -> Any:  # noqa: N805 - a tiny context manager
                inner.settings = temporary_settings(updates={PREFECT_API_URL: self.api})
                inner.settings.__enter__()
                inner.client = get_client(sync_client=True)
                return inner.client.__enter__()

            def __exit__(inner, *exc: Any) -> None:  # noqa: N805
                inner.client.__exit__(*exc)
                inner.settings.__exit__(*exc)

        return Scoped()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=30)


class Worker:
    """The README's ``prefect worker start`` line, in the background, its output in a file."""

    def __init__(self, command: str, env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen([PREFECT, *shlex.split(command)[1:]], cwd=ROOT, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> str:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=60)
        return self.log.read_text()


@pytest.fixture(scope="module")
def process_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PrefectServer, list[str], list[str]]]:
    """A Prefect server on which the README's commands for a host without Docker have run (all but the worker):
    the server, those commands and their outputs."""
    server = PrefectServer(tmp_path_factory.mktemp("prefect-home"))
    try:
        commands = readme_commands(PROCESS_HOST)
        outputs = []
        for command in commands:
            if command.startswith("prefect ") and " worker start " not in f" {command} ":
                outputs.append(_prefect(*shlex.split(command)[1:], env=server.environ(), timeout=300).stdout)
        yield server, commands, outputs
    finally:
        server.stop()


def _rows(pg: psycopg.Connection[Any], table: str) -> int:
    """Rows in ``table``; -1 while it does not exist."""
    try:
        row = pg.execute(f"SELECT count(*) FROM {table}").fetchone()
    except psycopg.errors.UndefinedTable:
        return -1
    return int(row[0]) if row else -1


def _run_id(created: str) -> str:
    return next(line.split("UUID:")[1].strip() for line in created.splitlines() if "UUID:" in line)


def _final_state(server: PrefectServer, run_id: str) -> Any:
    with server.client() as client:
        return client.read_flow_run(run_id).state


@pytest.mark.slow
@pytest.mark.emulator
@pytest.mark.once  # about Prefect, not the database: one pass runs it
@pytest.mark.second  # run in the second pass (pyproject.toml markers)
def test_the_readme_deploys_a_process_only_host_then_a_parameterized_run_and_the_scale_out(
    env: Settings, pg: psycopg.Connection[Any], tmp_path: Path, process_host: tuple[PrefectServer, list[str], list[str]]
) -> None:
    server, commands, outputs = process_host
    # The README's block: the server and the checkout named, the process pool created, the process set deployed
    # by name (no docker pool exists on this server), a worker started.
    kinds = [" ".join(c.split()[:3]) for c in commands]
    assert kinds == ["export PREFECT_API_URL=http://your-server:4200/api", "export BQ_REFRESH_HOME=/path/to/checkout",
                     "prefect work-pool create", "prefect --no-prompt deploy", "prefect worker start"], commands
    assert outputs[1].count("successfully created") == 3, outputs[1]
    with server.client() as client:
        deployed = {d.name: d for d in client.read_deployments()}
        assert {p.name for p in client.read_work_pools()} == {"bq-refresh-process"}
    assert set(deployed) == {"daily-refresh-process", "refresh-table-process", "maintenance-process"}
    nightly = deployed["daily-refresh-process"]
    assert [(s.active, getattr(s.schedule, "cron", None)) for s in nightly.schedules] == [(True, "0 2 * * *")]
    assert [(s.active, getattr(s.schedule, "cron", None)) for s in deployed["maintenance-process"].schedules] == [
        (True, "0 3 * * 0")]
    assert nightly.concurrency_limit == 1 or getattr(nightly, "global_concurrency_limit", None) is not None

    apply_migrations(pg, env.schema_name)
    source = BigQuerySource.from_settings(env)
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(25))
    register_table(pg, env.schema_name, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})
    worker = Worker(commands[-1], server.environ(), tmp_path / "worker.log")
    try:
        run = _prefect("deployment", "run", "refresh-table/refresh-table-process", "-p", "table=sqp",
                       "-p", "dry_run=false", env=server.environ())
        _until("the manual run", lambda: _rows(pg, f'"{env.schema_name}".sqp') == 25)
        _until("its final state", lambda: _final_state(server, _run_id(run.stdout)).is_final())
        assert pg.execute(f'SELECT status FROM "{env.schema_name}".refresh_audit_log').fetchall() == [("success",)]

        # Scale-out with no table_deployment: each table goes to the refresh-table deployment of the parent's pool.
        put_table(source, "sqp", SQP_SCHEMA, sqp_rows(40))
        night = _prefect("deployment", "run", "daily-refresh/daily-refresh-process", "-p", "use_deployments=true",
                         "-p", "force=true", env=server.environ())
        _until("the scaled-out night", lambda: _final_state(server, _run_id(night.stdout)).is_final())
        assert _final_state(server, _run_id(night.stdout)).is_completed()
        assert pg.execute(f'SELECT count(*) FROM "{env.schema_name}".sqp').fetchone() == (40,)
        with server.client() as client:
            runs = {str(r.id): r for r in client.read_flow_runs()}
        # Named after the table as it was given: the manual run "sqp", the night's run the registry name.
        assert runs[_run_id(run.stdout)].name == "sqp"
        (scaled,) = [r for r in runs.values() if r.name == f"{env.schema_name}.sqp"]
        assert scaled.deployment_id == deployed["refresh-table-process"].id
    finally:
        worker.stop()


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def ui_text(server: PrefectServer, path: str, screenshot: Path | None = None) -> str:
    """The Prefect UI page ``path`` rendered by headless Chromium: its DOM (and a screenshot when asked)."""
    browser = chromium()
    assert browser is not None
    url = f"http://127.0.0.1:{server.port}{path}"
    # The run list is a virtual scroller: without the compositor stages the dumped DOM has no rows.
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000", "--window-size=1600,1000",
             "--run-all-compositor-stages-before-draw"]
    if screenshot is not None:
        subprocess.run([browser, *flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=120,
                       check=True)
    return subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120,
                          check=True).stdout


@pytest.mark.slow
@pytest.mark.emulator
@pytest.mark.once
@pytest.mark.second  # run in the second pass (pyproject.toml markers)
def test_a_failing_night_on_a_process_worker_fails_plainly_and_notifies_once_per_channel(
    env: Settings, pg: psycopg.Connection[Any], tmp_path: Path, webhook: WebhookReceiver,
    process_host: tuple[PrefectServer, list[str], list[str]],
) -> None:
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.automations import apply_failure_automation

    server, commands, _ = process_host
    s = env.schema_name
    apply_migrations(pg, s)
    put_table(BigQuerySource.from_settings(env), "sqp", SQP_SCHEMA, sqp_rows(20))
    spec = {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"}
    register_table(pg, s, "sqp", spec)
    register_table(pg, s, "broken", {**spec, "source": "missing_source"})

    # Channels: bq-refresh's webhook, and a notification block that both bq-refresh and the automation use.
    block_channel = WebhookReceiver()
    grace = timedelta(seconds=15)
    with temporary_settings(updates={PREFECT_API_URL: server.api}):
        CustomWebhookNotificationBlock(name="ops", url=block_channel.url, json_data={"text": "{{body}}"}).save(
            "bq-refresh-alerts", overwrite=True)
        apply_failure_automation("custom-webhook/bq-refresh-alerts", grace)
    worker = Worker(commands[-1], server.environ(REFRESH_WEBHOOK_URL=webhook.url,
                                                 REFRESH_NOTIFICATION_BLOCK="custom-webhook/bq-refresh-alerts"),
                    tmp_path / "worker.log")
    try:
        night = _run_id(_prefect("deployment", "run", "daily-refresh/daily-refresh-process", "-p", "force=true",
                                 env=server.environ()).stdout)
        _until("the failing night", lambda: _final_state(server, night).is_final())
        state = _final_state(server, night)
        assert state.is_failed() and state.message == f"1 table(s) failed: {s}.broken", state
        time.sleep(grace.total_seconds() + 15)  # the automation's window, and its evaluation every 5 s
        assert [json.loads(r["body"])["event"] for r in webhook.received] == ["table_failed"]
        assert json.loads(webhook.received[0]["body"])["table"] == f"{s}.broken"
        block_texts = [json.loads(r["body"])["text"] for r in block_channel.received]
        assert len(block_texts) == 1 and "table_failed" in block_texts[0] and f"{s}.broken" in block_texts[0], \
            block_texts

        # Nothing alarming besides: no TypeError, no "unexpected exception" from the engine, in the runs' logs.
        with server.client() as client:
            runs = [r.id for r in client.read_flow_runs() if str(r.id) == night or r.name in (f"{s}.sqp", f"{s}.broken")]
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=runs)))
        assert len(runs) == 3 and logs
        text = "\n".join(f"{log.level} {log.message}" for log in logs)
        for alarming in ("Unexpected result for failed state", "TypeError", "Engine execution exited"):
            assert alarming not in text, text
        assert "Unexpected result for failed state" not in worker.stop()

        # What bq-refresh cannot report is the automation's: a maintenance run that cannot reach its database
        # fails with no hook of ours; after the grace the automation notifies once, on its own channel only.
        worker = Worker(commands[-1], server.environ(BQ_REFRESH_DATABASE_URL=f"postgresql://nobody@127.0.0.1:{free_port()}/x",
                                                     REFRESH_WEBHOOK_URL=webhook.url), tmp_path / "worker2.log")
        maintenance = _run_id(_prefect("deployment", "run", "maintenance/maintenance-process", env=server.environ()).stdout)
        _until("the failing maintenance", lambda: _final_state(server, maintenance).is_final())
        assert _final_state(server, maintenance).is_failed()
        _until("the automation", lambda: len(block_channel.received) == 2, grace.total_seconds() + 60)
        time.sleep(6)
        assert len(block_channel.received) == 2 and len(webhook.received) == 1
        assert "maintenance" in json.loads(block_channel.received[1]["body"])["text"]

        if chromium() is not None:  # the UI names each table's runs
            page = ui_text(server, "/runs", tmp_path / "runs.png")
            for table in (f"{s}.sqp", f"{s}.broken"):
                assert table in page, page[-3000:]
            if os.environ.get("BQ_REFRESH_UI_SCREENSHOT"):
                shutil.copy(tmp_path / "runs.png", os.environ["BQ_REFRESH_UI_SCREENSHOT"])
    finally:
        worker.stop()
        block_channel.close()
