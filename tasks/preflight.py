"""Checks made before a run touches data: is the database connection one whose session state survives?

Through a transaction pooler (PgBouncer ``pool_mode = transaction``, Supabase's pooler on port 6543) each
transaction may run on another server connection: the table's advisory lock (a session lock), the session's
timeouts and anything else a session sets are lost or, worse, seen by another client. The refresh refuses such a
connection before touching data.

A lone client usually gets the same server connection back even from a transaction pooler, so a probe of the
backend pid passes by luck. The probe here holds a second client in an open transaction while it asks the first
for a setting it made in an earlier transaction: a session pooler (or a direct connection) keeps the first
client's server connection for it alone; a transaction pooler either hands the held connection (and the setting)
to the second client, or gives the first another connection (the setting gone), or makes it wait for one.
"""

from __future__ import annotations

import logging
import select
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg import pq
from psycopg.pq.abc import PGconn

from blocks.postgres import PostgresTarget
from bq_refresh.errors import ConfigError, TargetUnavailable

log = logging.getLogger(__name__)

PROBE_SETTING = "bq_refresh.session_probe"
TRANSACTION_POOLER_PORT = 6543  # Supabase's transaction pooler: a hint only, the probe decides
_WAITED = object()  # an answer that did not come within the probe's wait
_checked: dict[str, SessionProbe] = {}


@dataclass(frozen=True)
class SessionProbe:
    """What the probe saw: ``problem`` is None when session state survives across transactions."""

    problem: str | None
    hint: str | None = None  # e.g. the port of a transaction pooler, when the probe saw nothing wrong


def _ask(conn: PGconn, query: str, wait_s: float) -> object:
    """Send ``query`` (simple protocol; several statements allowed) and return the last column of the last row it
    produced (None for NULL or no row), or ``_WAITED`` when no answer came within ``wait_s`` (then cancelled)."""
    conn.send_query(query.encode())
    deadline = time.monotonic() + wait_s
    while True:
        conn.consume_input()
        if not conn.is_busy():
            break
        left = deadline - time.monotonic()
        if left <= 0:
            cancel = conn.get_cancel()
            cancel.cancel()
            return _WAITED
        select.select([conn.socket], [], [], left)
    value: object = None
    while (res := conn.get_result()) is not None:
        if res.status == pq.ExecStatus.FATAL_ERROR:
            raise ConfigError(f"session probe failed: {(res.error_message or b'').decode(errors='replace').strip()}")
        if res.status == pq.ExecStatus.TUPLES_OK and res.ntuples:
            raw = res.get_value(0, res.nfields - 1)  # the last column
            value = raw.decode() if raw is not None else None
    return value


def _open(uri: str) -> psycopg.Connection[Any]:
    """A plain session (none of the refresh's settings); the probe talks to it through its libpq handle."""
    try:
        return psycopg.connect(uri, autocommit=True, connect_timeout=15, application_name="bq-refresh probe")
    except psycopg.OperationalError as exc:
        raise TargetUnavailable(f"cannot connect to BQ_REFRESH_DATABASE_URL: {str(exc).strip()}") from None


def probe_session_state(uri: str, *, wait_s: float = 3.0, rounds: int = 4) -> SessionProbe:
    """Whether a session's state survives from one transaction to the next on ``uri`` (see the module's doc).

    Each round asks with a new token; a busy pool (other clients' transactions) can make one round land on the
    first session's own server connection again by chance, so the probe stops at the first round that sees
    the state lost or shared.

    Args:
        uri: the PostgreSQL URI (never logged).
        wait_s: how long one answer may take before it counts as a wait for a server connection.
        rounds: rounds of the probe when none sees a problem.
    """
    for _ in range(rounds):
        problem = _probe_round(uri, wait_s)
        if problem is _WAITED:
            return SessionProbe(None, f"the probe could not run (no server connection within {wait_s:g} s):"
                                      " the pool is busy")
        if problem is not None:
            return SessionProbe(str(problem))
    port = urlsplit(uri).port if uri.startswith(("postgresql://", "postgres://")) else None
    hint = (f"port {TRANSACTION_POOLER_PORT} is Supabase's transaction pooler port, but session state survived here"
            if port == TRANSACTION_POOLER_PORT else None)
    return SessionProbe(None, hint)


def _probe_round(uri: str, wait_s: float) -> object:
    """One round: None when the session kept its state, else why not (or _WAITED when it could not start)."""
    token = uuid.uuid4().hex
    first_conn = _open(uri)
    first = first_conn.pgconn
    second_conn: psycopg.Connection[Any] | None = None
    try:
        pid = _ask(first, f"SELECT set_config('{PROBE_SETTING}', '{token}', false), pg_backend_pid()::text", wait_s)
        if pid is _WAITED:
            return _WAITED
        second_conn = _open(uri)
        second = second_conn.pgconn
        # The second client opens a transaction and keeps it: its server connection is its own until it ends.
        seen = _ask(second, f"BEGIN; SELECT current_setting('{PROBE_SETTING}', true)", wait_s)
        if seen == token:
            return ("another client's transaction ran on this session's server connection and saw the setting"
                    " this session made: server connections are shared per transaction")
        mine = _ask(first, f"SELECT current_setting('{PROBE_SETTING}', true) || ' ' || pg_backend_pid()", wait_s)
        if mine is _WAITED:
            return (f"this session waited over {wait_s:g} s for a server connection between two of its"
                    " transactions while another client held one: server connections are pooled per transaction")
        if mine != f"{token} {pid}":
            return ("this session's next transaction ran on another server connection (its setting gone):"
                    " server connections are pooled per transaction")
        return None
    finally:
        if second_conn is not None:
            second_conn.close()
        first_conn.close()


def require_session_state(target: PostgresTarget) -> None:
    """Refuse a database connection that loses session state between transactions (checked once per process and
    URI; a run calls it before touching data).

    Raises:
        ConfigError: one line saying what is wrong and which connection string to use instead.
    """
    uri = target.uri()
    probe = _checked.get(uri)
    if probe is None:
        probe = _checked[uri] = probe_session_state(uri)
        if probe.hint:
            log.warning("BQ_REFRESH_DATABASE_URL: %s", probe.hint)
    if probe.problem:
        raise ConfigError(
            f"BQ_REFRESH_DATABASE_URL goes through a transaction pooler ({probe.problem}); the refresh needs its"
            " session across transactions (its table lock is a session advisory lock, its timeouts are session"
            " settings), so nothing was touched. Use a session-mode connection instead: Supabase's session pooler"
            " (the pooler host, port 5432) or the direct connection (db.<project>.supabase.co:5432); with PgBouncer,"
            " pool_mode = session")


def session_check(target: PostgresTarget) -> dict[str, str]:
    """The probe as a ``bq-refresh doctor`` line: ok, warn (a hint, e.g. port 6543) or fail (a transaction pooler)."""
    probe = probe_session_state(target.uri())
    if probe.problem:
        return {"name": "session", "status": "fail",
                "message": f"BQ_REFRESH_DATABASE_URL goes through a transaction pooler ({probe.problem}): use the"
                           " session pooler (port 5432) or the direct connection"}
    if probe.hint:
        return {"name": "session", "status": "warn", "message": probe.hint}
    return {"name": "session", "status": "ok",
            "message": "session state survives across transactions (direct connection or session pooler)"}
