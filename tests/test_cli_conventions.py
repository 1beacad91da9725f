"""The command line behaves like the tools operators know, through its real entry point as a subprocess: click's
usage errors, --version, help on every option, choices, shell completion; exit codes a script can use (0 all good,
1 a table failed or a difference, 2 usage or configuration, 3 a service unreachable), each error one line off a
terminal at 80 columns naming what to change; dependencies that refuse a cycle and can be removed; enable --all."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from typing import Any

import psycopg
import pytest
import typer

from bq_refresh.services import free_port
from bq_refresh.settings import Settings
from flows.cli import app
from tasks.migrations import apply_migrations
from tasks.registry import get_entry, list_dependencies, register_table
from tests.conftest import ROOT

BIN = ROOT / ".venv" / "bin" / "bq-refresh"
SPEC = {"source": "sqp", "key": ["id"], "cursor": "updated_at"}


def cli(*args: str, env: dict[str, str], program: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(program or [sys.executable, "-m", "flows.cli"]), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)


def one_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The exit code is ``code`` and stderr is one line, the error (nothing wrapped, no traceback)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


@pytest.fixture
def offline_env(tmp_path: Any) -> dict[str, str]:
    """No database behind BQ_REFRESH_DATABASE_URL: nothing here may need one (or start the embedded one)."""
    return {**os.environ, "COLUMNS": "80", "BQ_REFRESH_STATE_DIR": str(tmp_path),
            "BQ_REFRESH_DATABASE_URL": f"postgresql://postgres:pw@127.0.0.1:{free_port()}/postgres"}


@pytest.fixture
def cli_env(env: Settings, pg: psycopg.Connection[Any]) -> dict[str, str]:
    """The test's database, schema (migrated) and emulator dataset, at 80 columns."""
    apply_migrations(pg, env.schema_name)
    return {**os.environ, "COLUMNS": "80"}


@pytest.mark.once
def test_version_and_help_exit_0(offline_env: dict[str, str]) -> None:
    shown = cli("--version", env=offline_env)
    assert (shown.returncode, shown.stdout) == (0, f"bq-refresh {version('bq-refresh')}\n"), shown.stderr
    for args in ([], ["tables"], ["--help"], ["run", "--help"]):
        helped = cli(*args, env=offline_env)
        assert helped.returncode == 0 and "Usage" in helped.stdout, (args, helped.stderr[-2000:])
        assert helped.stderr == "", (args, helped.stderr)


@pytest.mark.once
@pytest.mark.parametrize(("args", "says"), [
    (["--bogus"], "Error: No such option: --bogus"),
    (["tables", "show"], "Error: Missing argument"),
    (["history", "--status", "bogus"], "Error: Invalid value for '--status'"),
    (["history", "--limit", "many"], "Error: Invalid value for '--limit'"),
    (["tables", "add", "t", "--source", "t", "--key", "id", "--mode", "sideways"], "Error: Invalid value for '--mode'"),
    (["tables", "add", "t", "--source", "t", "--key", "id", "--params", "{bad"], "Error: Invalid value for '--params'"),
    (["tables", "set", "t", "--params", "[1, 2]"], "Error: Invalid value for '--params': give a JSON object"),
    (["tables", "enable"], "give a table or --all"),
])
def test_usage_errors_exit_2_with_try_help(offline_env: dict[str, str], args: list[str], says: str) -> None:
    result = cli(*args, env=offline_env)
    assert result.returncode == 2, result.stderr
    assert "Try '" in result.stderr and "--help' for help." in result.stderr
    assert says in result.stderr and "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and says in error[0], result.stderr


@pytest.mark.once
def test_choices_name_their_values(offline_env: dict[str, str]) -> None:
    bad = cli("history", "--status", "bogus", env=offline_env)
    assert all(s in bad.stderr for s in ("running", "success", "failed", "warning", "skipped"))
    bad = cli("tables", "add", "t", "--source", "t", "--key", "id", "--mode", "sideways", env=offline_env)
    assert all(s in bad.stderr for s in ("incremental", "window", "full"))


@pytest.mark.once
def test_shell_completion(offline_env: dict[str, str]) -> None:
    script = cli("--show-completion", "bash", env=offline_env, program=[str(BIN)])
    assert script.returncode == 0 and "_BQ_REFRESH_COMPLETE" in script.stdout, script.stderr
    asked = cli(env={**offline_env, "_BQ_REFRESH_COMPLETE": "complete_bash", "COMP_WORDS": "bq-refresh history --status ",
                     "COMP_CWORD": "3"}, program=[str(BIN)])
    assert asked.stdout.split() == ["running", "success", "failed", "warning", "skipped"], asked.stderr
    top = cli("--help", env=offline_env, program=[str(BIN)])
    assert "--install-completion" in top.stdout and "--show-completion" in top.stdout


def commands(command: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    found = [(path, command)]
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        found += commands(sub, (*path, name))
    return found


@pytest.mark.once
def test_every_option_and_argument_has_help() -> None:
    from typer.testing import CliRunner

    walked = commands(typer.main.get_command(app))
    assert len(walked) > 20
    missing = [(" ".join(path), p.name) for path, cmd in walked for p in cmd.params if not getattr(p, "help", None)]
    assert missing == []
    for path, cmd in walked:
        shown = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert shown.exit_code == 0, (path, shown.output)
        for p in cmd.params:
            for flag in p.opts if p.param_type_name == "option" else []:
                assert flag in shown.output, (path, flag)


def test_exit_0_and_1(cli_env: dict[str, str], pg: psycopg.Connection[Any], env: Settings) -> None:
    schema, shadow = env.schema_name, env.shadow_schema
    register_table(pg, schema, "sqp", {**SPEC, "shadow": True})
    assert cli("tables", "list", env=cli_env).returncode == 0
    pg.execute(f'CREATE SCHEMA "{shadow}"')
    for where in (schema, shadow):
        pg.execute(f'CREATE TABLE "{where}".sqp (id int PRIMARY KEY, v text)')
        pg.execute(f'INSERT INTO "{where}".sqp SELECT i, \'v\' || i FROM generate_series(1, 5) i')
    same = cli("shadow", "compare", "sqp", env=cli_env)
    assert same.returncode == 0 and "5 same, 0 different" in same.stdout, same.stderr
    pg.execute(f'UPDATE "{shadow}".sqp SET v = \'changed\' WHERE id = 2')
    differs = cli("shadow", "compare", "sqp", env=cli_env)
    assert differs.returncode == 1, differs.stderr
    summary = differs.stdout.splitlines()[0]  # longer than 80 columns, and still one line
    assert summary == f"{schema}.sqp vs {shadow}.sqp: 4 same, 1 different, 0 only in live, 0 only in shadow"


def test_exit_2_configuration(cli_env: dict[str, str], pg: psycopg.Connection[Any], env: Settings) -> None:
    schema = env.schema_name
    register_table(pg, schema, "a", SPEC)
    unknown = one_error(cli("run", "--table", "no_such_table", env=cli_env), 2)  # before Prefect starts
    assert unknown.startswith(f"error: not registered: {schema}.no_such_table") and "tables list" in unknown
    invalid = one_error(cli("tables", "set", "a", "--params", '{"mode": "sideways"}', env=cli_env), 2)
    assert f"{schema}.a: invalid sync parameters" in invalid and "mode" in invalid
    setting = one_error(cli("status", env={**cli_env, "REFRESH_VERIFY_SAMPLE": "3"}), 2)
    assert "REFRESH_VERIFY_SAMPLE" in setting and "power of 2" in setting


def test_uninitialised_schema_says_init(env: Settings) -> None:
    for args in (["status"], ["tables", "list"], ["run", "--force"]):
        said = one_error(cli(*args, env={**os.environ, "COLUMNS": "80"}), 2)
        assert said.startswith(f"error: schema {env.schema_name} is not initialised"), said
        assert "run bq-refresh init" in said and "BQ_REFRESH_SCHEMA" in said


@pytest.mark.emulator
def test_wrong_project_or_dataset_named_before_prefect_starts(cli_env: dict[str, str], pg: psycopg.Connection[Any],
                                                              env: Settings) -> None:
    register_table(pg, env.schema_name, "a", SPEC)
    nodata = one_error(cli("run", "--table", "a", env={**cli_env, "BIGQUERY_DATASET": "no_such_dataset"}), 2)
    assert nodata == (f"error: BigQuery dataset {env.bigquery_project_id}.no_such_dataset not found (read by"
                      f" {env.schema_name}.a): set BIGQUERY_PROJECT_ID ({env.bigquery_project_id}) and"
                      " BIGQUERY_DATASET (no_such_dataset) to where the sources are")
    noproject = one_error(cli("run", "--force", env={**cli_env, "BIGQUERY_PROJECT_ID": "no-such-project"}), 2)
    assert f"BigQuery dataset no-such-project.{env.bigquery_dataset} not found" in noproject
    assert "BIGQUERY_PROJECT_ID (no-such-project)" in noproject
    register_table(pg, env.schema_name, "b", {**SPEC, "source": "other_dataset.sqp"})
    own = one_error(cli("run", "--table", "b", env=cli_env), 2)
    assert f"BigQuery dataset {env.bigquery_project_id}.other_dataset not found (read by {env.schema_name}.b)" in own
    assert "tables set NAME --params" in own


def test_exit_3_postgresql_unreachable(offline_env: dict[str, str]) -> None:
    for args in (["status"], ["tables", "list"], ["run"], ["init"]):
        said = one_error(cli(*args, env=offline_env), 3)
        assert said.startswith("error: cannot reach PostgreSQL (") and "Connection refused" in said, said
        assert said.endswith("check BQ_REFRESH_DATABASE_URL and that the server is running")
        assert ":pw@" not in said


@pytest.mark.emulator
def test_exit_3_bigquery_unreachable(cli_env: dict[str, str], pg: psycopg.Connection[Any], env: Settings) -> None:
    register_table(pg, env.schema_name, "a", SPEC)
    nobody = f"http://127.0.0.1:{free_port()}"
    said = one_error(cli("run", "--table", "a", env={**cli_env, "BIGQUERY_API_ENDPOINT": nobody,
                                                     "BIGQUERY_TIMEOUT_SECONDS": "2"}), 3)
    assert said.startswith(f"error: BigQuery unreachable at {nobody}") and "check BIGQUERY_API_ENDPOINT" in said


def deps(pg: psycopg.Connection[Any], schema: str) -> set[tuple[str, str, str]]:
    return {(d.parent.split(".")[1], d.dependent.split(".")[1], d.kind) for d in list_dependencies(pg, schema)}


@pytest.mark.once  # the command's conventions, not the server: the first pass only
def test_dependencies_refuse_a_cycle_and_can_be_removed(cli_env: dict[str, str], pg: psycopg.Connection[Any],
                                                        env: Settings) -> None:
    schema = env.schema_name
    for name in ("a", "b", "c"):
        register_table(pg, schema, name, SPEC)
    assert cli("tables", "set", "b", "--depends-on", "a", env=cli_env).returncode == 0
    assert cli("tables", "set", "c", "--soft-depends-on", "b", env=cli_env).returncode == 0
    before = deps(pg, schema)
    assert before == {("a", "b", "hard"), ("b", "c", "soft")}

    cycle = one_error(cli("tables", "set", "a", "--priority", "5", "--depends-on", "c", env=cli_env), 2)
    assert cycle == (f"error: {schema}.a: refused: depending on {schema}.c makes a dependency cycle:"
                     f" {schema}.a -> {schema}.b -> {schema}.c -> {schema}.a; nothing changed")
    assert deps(pg, schema) == before and get_entry(pg, schema, "a").priority == 100  # all or nothing
    one_error(cli("tables", "set", "a", "--depends-on", "a", env=cli_env), 2)
    assert deps(pg, schema) == before

    assert cli("tables", "set", "b", "--no-depends-on", "a", env=cli_env).returncode == 0
    assert deps(pg, schema) == {("b", "c", "soft")}
    gone = one_error(cli("tables", "set", "b", "--no-depends-on", "a", env=cli_env), 2)
    assert f"{schema}.b: does not depend on {schema}.a" in gone
    assert cli("tables", "set", "a", "--depends-on", "c", env=cli_env).returncode == 0  # no cycle any more
    assert deps(pg, schema) == {("b", "c", "soft"), ("c", "a", "hard")}


@pytest.mark.usefixtures("prefect_harness")
def test_enable_all_after_rollback(cli_env: dict[str, str], pg: psycopg.Connection[Any], env: Settings) -> None:
    from prefect.settings import PREFECT_API_URL

    for name in ("a", "b"):
        register_table(pg, env.schema_name, name, SPEC)
    rolled = cli("rollback", "--yes", env=cli_env)
    assert rolled.returncode == 0 and "bq-refresh tables enable --all" in rolled.stdout
    ran = cli("run", "--force", env={**cli_env, "PREFECT_API_URL": str(PREFECT_API_URL.value())})
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "every table is disabled (2; bq-refresh rollback disables them all): bq-refresh tables enable --all" \
        in ran.stdout
    assert "use --force" not in ran.stdout + ran.stderr
    enabled = cli("tables", "enable", "--all", env=cli_env)
    assert enabled.returncode == 0 and enabled.stdout.strip() == \
        f"2 table(s) enabled: {env.schema_name}.a, {env.schema_name}.b"
    assert all(get_entry(pg, env.schema_name, n).is_enabled for n in ("a", "b"))
