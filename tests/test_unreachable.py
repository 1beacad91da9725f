"""BigQuery unreachable: the retry layers (Google's clients, ours, Prefect's task retries) share one deadline,
BIGQUERY_TIMEOUT_SECONDS, instead of multiplying theirs. Through the real entry point in a subprocess: `bq-refresh
run` says the first error within 15 s and exits with the documented code (3: a service unreachable; 1 when
BigQuery answered the preflight and a table then failed) within the budget in all, against a closed port and a
black hole (a listening socket that accepts and never answers)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import requests
from psycopg import sql

from bq_refresh.services import free_port
from bq_refresh.settings import Settings
from tasks.deadline import FIRST_ERROR_S
from tasks.migrations import apply_migrations
from tasks.registry import register_table
from tests.bqdata import put_table
from tests.conftest import ROOT
from tests.test_engine import SQP_KEY, SQP_SCHEMA, sqp_rows

BUDGET_S = 8  # BIGQUERY_TIMEOUT_SECONDS of these runs: short, so that the tests are
LONG_BUDGET_S = 20  # longer than FIRST_ERROR_S: the first error must come before the budget ends
STARTUP_S = 8  # the interpreter's imports and PostgreSQL's round trips before the first BigQuery call, generously


class BlackHole:
    """A TCP port that accepts connections and never answers a byte (a firewall that drops replies, a hung
    proxy): every client waits for its own timeout."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)  # kept open, never read or written

    def close(self) -> None:
        self.closed.set()
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def black_hole() -> Iterator[BlackHole]:
    hole = BlackHole()
    yield hole
    hole.close()


def run_timed(args: list[str], env: dict[str, str], limit_s: float) -> tuple[int, list[tuple[float, str]], float]:
    """Run the CLI; (exit code, stderr lines each with the seconds since the start it arrived, wall seconds)."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        assert proc.stderr is not None
        for text in proc.stderr:
            lines.append((time.monotonic() - started, text.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    wall = time.monotonic() - started
    reader.join(5)
    return proc.returncode, lines, wall


@pytest.fixture
def cli_env(env: Settings, pg: psycopg.Connection[Any]) -> dict[str, str]:
    apply_migrations(pg, env.schema_name)
    register_table(pg, env.schema_name, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})
    return {**os.environ, "COLUMNS": "80", "BIGQUERY_TIMEOUT_SECONDS": str(BUDGET_S)}


def said(lines: list[tuple[float, str]]) -> list[str]:
    return [text for _, text in lines if text.strip()]


@pytest.mark.emulator
@pytest.mark.once
@pytest.mark.parametrize(("fault", "budget_s"), [("closed port", BUDGET_S), ("black hole", LONG_BUDGET_S)])
def test_run_against_an_unreachable_bigquery_says_so_early_and_exits_3_within_the_budget(
    cli_env: dict[str, str], black_hole: BlackHole, fault: str, budget_s: int,
) -> None:
    """Both endpoints down. The black hole runs with a budget longer than 15 s: its first error must come before
    the budget ends (each attempt waits at most 10 s), then the one error line; the closed port's short budget
    ends first, one line."""
    port = black_hole.port if fault == "black hole" else free_port()
    endpoint = f"http://127.0.0.1:{port}"
    code, lines, wall = run_timed(["run", "--table", "sqp"], {
        **cli_env, "BIGQUERY_TIMEOUT_SECONDS": str(budget_s), "BIGQUERY_API_ENDPOINT": endpoint,
        "BIGQUERY_STORAGE_ENDPOINT": f"127.0.0.1:{port}"}, limit_s=budget_s + STARTUP_S + 120)
    assert code == 3, (code, wall, lines)
    assert said(lines)[-1].startswith(f"error: BigQuery unreachable at {endpoint} (no answer within"
                                      f" BIGQUERY_TIMEOUT_SECONDS={budget_s} s; last error: "), lines
    assert said(lines)[-1].endswith("check BIGQUERY_API_ENDPOINT and the network"), lines
    first = next(t for t, text in lines if text.strip())
    assert first <= FIRST_ERROR_S, lines
    assert wall <= budget_s + STARTUP_S, (wall, lines)
    if budget_s > FIRST_ERROR_S:
        assert said(lines)[0].startswith(f"warning: BigQuery unreachable at {endpoint} ("), lines
        assert said(lines)[0].endswith(f"trying until BIGQUERY_TIMEOUT_SECONDS={budget_s} s have passed"), lines
    else:
        assert len(said(lines)) == 1, lines


@pytest.mark.emulator
@pytest.mark.once
def test_run_whose_read_api_is_a_black_hole_exits_3_before_prefect_starts(
    cli_env: dict[str, str], source: Any, black_hole: BlackHole,
) -> None:
    """The REST API answers (the emulator), the Storage Read API's port is a black hole: refused in the preflight."""
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(10))
    code, lines, wall = run_timed(["run", "--table", "sqp"], {
        **cli_env, "BIGQUERY_STORAGE_ENDPOINT": f"127.0.0.1:{black_hole.port}"}, limit_s=BUDGET_S + STARTUP_S + 120)
    assert (code, said(lines)) == (3, [
        f"error: BigQuery Storage Read API unreachable at 127.0.0.1:{black_hole.port} (no connection within"
        f" BIGQUERY_TIMEOUT_SECONDS={BUDGET_S} s): check BIGQUERY_STORAGE_ENDPOINT and the network"]), (wall, lines)
    assert wall <= BUDGET_S + STARTUP_S, (wall, lines)


@pytest.mark.emulator
@pytest.mark.once
@pytest.mark.usefixtures("prefect_harness")
def test_a_table_whose_read_api_turns_black_hole_fails_once_within_the_budget_not_once_per_retry(
    env: Settings, pg: psycopg.Connection[Any], source: Any, black_hole: BlackHole, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past the preflight (the flow itself, REFRESH_RETRIES=3 as by default): opening the read session waits the
    budget once; Prefect does not retry a BigQuery that gave no answer for it. Each retry would wait it again."""
    from flows.refresh_table import refresh_table

    apply_migrations(pg, env.schema_name)
    register_table(pg, env.schema_name, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(10))
    monkeypatch.setenv("BIGQUERY_TIMEOUT_SECONDS", "4")
    monkeypatch.setenv("BIGQUERY_STORAGE_ENDPOINT", f"127.0.0.1:{black_hole.port}")
    monkeypatch.setenv("REFRESH_RETRIES", "3")
    monkeypatch.setenv("REFRESH_RETRY_DELAY_SECONDS", "1")
    started = time.monotonic()
    with pytest.raises(Exception, match="Storage Read API unavailable") as failure:
        refresh_table("sqp")
    took = time.monotonic() - started
    assert f"{env.schema_name}.sqp" in str(failure.value)
    assert took < 4 + 6, took  # one budget and the flow's own bookkeeping; 3 retries would add 3 x (4 + 1..4) s
    row = pg.execute(sql.SQL("SELECT status, error_message FROM {} ORDER BY id DESC LIMIT 1").format(
        sql.Identifier(env.schema_name, "refresh_audit_log"))).fetchone()
    assert row is not None and row[0] == "failed" and "Storage Read API unavailable" in row[1], row


@pytest.mark.once
def test_the_default_budget_adds_up_to_60_s_across_the_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset, BIGQUERY_TIMEOUT_SECONDS is 60; Google's retry deadline is that budget; our attempts show the first
    error within 15 s; and Prefect adds no retry once it is spent, whatever REFRESH_RETRIES says."""
    from google.api_core import exceptions as gexc

    from blocks.bigquery import BigQuerySource
    from bq_refresh.errors import SourceUnavailable
    from tasks.deadline import BACKOFF_S, Budget, worth_retrying
    from tasks.extract import short_retry

    for name in ("BIGQUERY_TIMEOUT_SECONDS", "REFRESH_RETRIES"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    budget_s = BigQuerySource.from_settings(settings).timeout_s
    assert budget_s == settings.bigquery_timeout_s == 60
    assert short_retry(budget_s)._timeout == budget_s  # Google's REST retries give up at the budget
    assert Budget(budget_s).attempt_s + BACKOFF_S[0] <= FIRST_ERROR_S  # our first attempt's error, said early

    def raised_from(cause: BaseException) -> SourceUnavailable:
        try:
            try:
                raise cause
            except type(cause):
                raise SourceUnavailable("BigQuery unavailable", table="t") from None
        except SourceUnavailable as exc:
            return exc

    no_answer = [gexc.RetryError("Timeout of 60.0s exceeded", ConnectionError()), gexc.DeadlineExceeded("late"),
                 requests.exceptions.ReadTimeout("read timed out"), requests.exceptions.ConnectionError("refused")]
    per_retry = budget_s + settings.retry_delay_s * 2 ** (settings.retries - 1)
    for cause in no_answer:
        retried = worth_retrying(raised_from(cause))
        assert budget_s + (settings.retries * per_retry if retried else 0) <= 60, cause
    # An error BigQuery answered at once (a stream cut mid-read) is still retried: it resumes from the checkpoint.
    assert worth_retrying(raised_from(gexc.ServiceUnavailable("stream reset"))) and settings.retries == 3
    # A 503 or quota storm that outlasted Google's retry was answered every time: Prefect still retries it.
    for answered in (gexc.ServiceUnavailable("503"), gexc.TooManyRequests("quota"), gexc.InternalServerError("500")):
        assert worth_retrying(raised_from(gexc.RetryError("Timeout of 60.0s exceeded", answered))), answered
        assert worth_retrying(gexc.RetryError("Timeout of 60.0s exceeded", answered)), answered
    assert not worth_retrying(raised_from(gexc.RetryError("Timeout of 60.0s exceeded", gexc.DeadlineExceeded("504"))))
