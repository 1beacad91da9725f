"""The local state folder does not depend on the current directory: $XDG_STATE_HOME/bq-refresh (or
~/.local/state/bq-refresh) unless BQ_REFRESH_STATE_DIR says otherwise, a .env in the current directory read too.
After `demo --keep-up` every command finds the demo's emulator and database from any folder; `demo --stop` stops
them and says so; nothing is started twice. Through the real entry point as a subprocess, on a temporary
XDG_STATE_HOME (HOME is kept: the emulator's DuckDB extensions live there)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from bq_refresh.services import EmulatorEndpoints, stop_embedded_postgres, stop_emulator
from bq_refresh.settings import Settings, default_state_dir, load_settings
from tests.conftest import ROOT, embedded_postgres_pids

BIN = ROOT / ".venv" / "bin" / "bq-refresh"
OURS = ("BQ_REFRESH_", "BIGQUERY_", "GOOGLE_APPLICATION_CREDENTIALS", "XDG_STATE_HOME")


def bare_env(xdg: Path, **extra: str) -> dict[str, str]:
    """The environment of a user who configured nothing: no setting of ours, no Prefect home, XDG_STATE_HOME set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(OURS) and k not in ("PREFECT_HOME", "PREFECT_API_URL")}
    return {**env, "XDG_STATE_HOME": str(xdg), "COLUMNS": "200", **extra}


def cli(*args: str, cwd: Path, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def processes_on(folder: Path) -> list[str]:
    """Live processes whose command line names ``folder`` (a server or emulator left behind)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(folder) in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(f"{proc.info['pid']} {cmdline}")
    return found


@pytest.fixture
def xdg(tmp_path: Path) -> Iterator[Path]:
    """A temporary XDG_STATE_HOME; whatever runs in its bq-refresh folder at the end is stopped (and the test fails
    if the test itself left it running)."""
    home = tmp_path / "xdg"
    home.mkdir()
    yield home
    state = home / "bq-refresh"
    left = processes_on(state)
    stop_emulator(state)
    stop_embedded_postgres(state)
    assert not left, f"left running: {left}"


@pytest.mark.parametrize(("xdg_state_home", "expected"), [
    ("/srv/state", Path("/srv/state/bq-refresh")),
    (None, Path.home() / ".local" / "state" / "bq-refresh"),
    ("relative/state", Path.home() / ".local" / "state" / "bq-refresh"),  # the XDG specification: ignored
    ("", Path.home() / ".local" / "state" / "bq-refresh"),
])
def test_default_state_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, xdg_state_home: str | None,
                                       expected: Path) -> None:
    monkeypatch.delenv("BQ_REFRESH_STATE_DIR", raising=False)
    if xdg_state_home is None:
        monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_STATE_HOME", xdg_state_home)
    monkeypatch.chdir(ROOT / "tests")
    assert default_state_dir() == expected
    assert Settings().state_dir == expected


def test_state_dir_setting_dotenv_and_absolute(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """BQ_REFRESH_STATE_DIR wins, made absolute once (a relative one is the current directory's); a .env in the
    current directory is read; the environment wins over the .env."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BQ_REFRESH_STATE_DIR", raising=False)
    monkeypatch.delenv("BQ_REFRESH_SCHEMA", raising=False)
    (tmp_path / ".env").write_text("BQ_REFRESH_STATE_DIR=from-dotenv\nBQ_REFRESH_SCHEMA=dotenv_schema\n")
    settings = Settings()
    assert (settings.state_dir, settings.schema_name) == (tmp_path / "from-dotenv", "dotenv_schema")
    monkeypatch.setenv("BQ_REFRESH_STATE_DIR", "~/elsewhere")
    monkeypatch.setenv("BQ_REFRESH_SCHEMA", "env_schema")
    settings = Settings()
    assert (settings.state_dir, settings.schema_name) == (Path.home() / "elsewhere", "env_schema")


@pytest.mark.emulator
@pytest.mark.parametrize(("configured", "adopted"), [
    ({}, True),
    ({"BIGQUERY_DATASET": "theirs"}, False),
    ({"BIGQUERY_PROJECT_ID": "their-project"}, False),
    ({"BQ_REFRESH_DATABASE_URL": "postgresql://u@db.example.com/x"}, False),
    ({"GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent/key.json"}, False),
])
def test_a_running_emulator_in_the_state_folder_is_the_source_on_the_embedded_default(
        monkeypatch: pytest.MonkeyPatch, emulator: EmulatorEndpoints, configured: dict[str, str],
        adopted: bool) -> None:
    """The session's real emulator, recorded in its state folder: load_settings takes its endpoints and project
    when nothing else is configured, and only then."""
    from tests.conftest import TEST_STATE

    for name in list(os.environ):
        if name.startswith(OURS):
            monkeypatch.delenv(name)
    monkeypatch.setenv("BQ_REFRESH_STATE_DIR", str(TEST_STATE / f"emulator-{os.getpid()}"))
    for name, value in configured.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    if adopted:
        assert (settings.bigquery_api_endpoint, settings.bigquery_storage_endpoint, settings.bigquery_project_id) == (
            emulator.rest_url, emulator.grpc_target, emulator.project)
    else:
        assert settings.bigquery_api_endpoint is None and settings.bigquery_storage_endpoint is None


@pytest.mark.once
@pytest.mark.second  # run in the second pass (pyproject.toml markers)
def test_commands_share_one_state_folder_from_any_directory(tmp_path: Path, xdg: Path) -> None:
    """init in one folder, status from two others and twice: one embedded PostgreSQL, in $XDG_STATE_HOME/bq-refresh,
    nothing written into the folders the commands ran from; a .env there is read; demo --stop stops the server and
    says so, and then that nothing runs (exit 0 both times)."""
    state = xdg / "bq-refresh"
    folders = [tmp_path / name for name in ("a", "b", "c")]
    for folder in folders:
        folder.mkdir()
    env = bare_env(xdg)
    done = cli("init", cwd=folders[0], env=env)
    assert done.returncode == 0, done.stderr
    first = embedded_postgres_pids(state)
    assert len(first) == 1, first
    for folder in folders[1:] * 2:
        shown = cli("status", "--json", cwd=folder, env=env)
        assert shown.returncode == 0, shown.stderr  # the schema init made: the same database
        assert shown.stderr == "", shown.stderr
        assert embedded_postgres_pids(state) == first
    assert (state / "pgdata" / "PG_VERSION").exists() and (state / "prefect").is_dir()
    for folder in folders:
        assert list(folder.iterdir()) == [], f"{folder} got {list(folder.iterdir())}"

    (folders[2] / ".env").write_text("BQ_REFRESH_SCHEMA=schema_from_dotenv\n")
    refused = cli("status", cwd=folders[2], env=env)
    assert refused.returncode == 2 and "schema schema_from_dotenv is not initialised" in refused.stderr, refused.stderr
    assert embedded_postgres_pids(state) == first

    stopped = cli("demo", "--stop", cwd=folders[1], env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == f"stopped the embedded PostgreSQL (pid {first[0]}, {state / 'pgdata'})"
    assert not embedded_postgres_pids(state) and not psutil.pid_exists(first[0])
    again = cli("demo", "--stop", cwd=folders[0], env=env)
    assert (again.returncode, again.stdout.strip()) == (0, f"nothing running in {state}"), again.stderr


@pytest.mark.slow
@pytest.mark.emulator
@pytest.mark.once
@pytest.mark.second  # run in the second pass (pyproject.toml markers)
@pytest.mark.usefixtures("prefect_harness")
def test_demo_keep_up_then_every_command_finds_it_and_stop_leaves_nothing(tmp_path: Path, xdg: Path) -> None:
    """demo --keep-up in one folder; from another, with no setting given: status and tables list show the demo's
    tables, run --force reads the demo's emulator (its rows land), history lists the runs; no second server was
    started; demo --stop stops the emulator and PostgreSQL, naming both, and no process of the state folder is left."""
    from prefect.settings import PREFECT_API_URL

    state = xdg / "bq-refresh"
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    env = bare_env(xdg, PREFECT_API_URL=str(PREFECT_API_URL.value()))
    demo = cli("demo", "--asins", "2", "--queries", "5", "--weeks", "2", "--keep-up", cwd=here, env=env, timeout=600)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "bq-refresh demo --stop" in demo.stdout
    record = json.loads((state / "bqemulator.json").read_text())
    postgres = embedded_postgres_pids(state)
    assert len(postgres) == 1 and psutil.pid_exists(record["pid"]), (postgres, record)

    listed = cli("tables", "list", "--json", cwd=there, env=env)
    assert listed.returncode == 0, listed.stderr
    assert {t["table"] for t in json.loads(listed.stdout)} >= {"sqp.asin_performance_data", "sqp.daily_sqp_data"}
    status = cli("status", "--json", cwd=there, env=env)
    assert status.returncode == 0 and "asin_performance_data" in status.stdout, status.stderr

    ran = cli("run", "--force", "--table", "daily_sqp_data", "--full-refresh", "--json", cwd=there, env=env,
              timeout=300)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    night = json.loads(ran.stdout)
    (table,) = night["tables"]
    assert (table["status"], table["rows_read"]) == ("success", 2 * 2 * 7 - 1), table  # the next day's source
    history = cli("history", "--table", "daily_sqp_data", "--json", cwd=there, env=env)
    assert history.returncode == 0 and len(json.loads(history.stdout)) == 3, history.stdout[-2000:]
    assert embedded_postgres_pids(state) == postgres  # nothing started twice
    assert json.loads((state / "bqemulator.json").read_text()) == record
    assert list(there.iterdir()) == [] and list(here.iterdir()) == []

    stopped = cli("demo", "--stop", cwd=there, env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == (
        f"stopped the BigQuery emulator (pid {record['pid']}, http://127.0.0.1:{record['rest_port']}) and the"
        f" embedded PostgreSQL (pid {postgres[0]}, {state / 'pgdata'})")
    assert processes_on(state) == [] and not psutil.pid_exists(record["pid"]) and not embedded_postgres_pids(state)
    again = cli("demo", "--stop", cwd=here, env=env)
    assert (again.returncode, again.stdout.strip()) == (0, f"nothing running in {state}")
