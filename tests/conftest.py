"""Shared fixtures: a real PostgreSQL (embedded, or BQ_REFRESH_DATABASE_URL) and the BigQuery emulator."""

from __future__ import annotations

import os
from pathlib import Path

from bq_refresh.offline import configure_offline_prefect

ROOT = Path(__file__).resolve().parents[1]
# The tests' local state (embedded PostgreSQL, emulators, Prefect home); BQ_REFRESH_TEST_STATE_DIR gives a
# session a folder of its own (tests/test_project.py runs one that way).
TEST_STATE = Path(os.environ.get("BQ_REFRESH_TEST_STATE_DIR") or ROOT / ".state" / "tests").resolve()
configure_offline_prefect(TEST_STATE)
import fcntl
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil
import psycopg
import pytest
from psycopg import sql

from blocks import BigQuerySource, PostgresTarget, Resources
from bq_refresh.services import (
    EmulatorEndpoints,
    start_embedded_postgres,
    start_emulator,
    stop_embedded_postgres,
    stop_emulator,
)
from bq_refresh.settings import Settings

EMULATOR_PROJECT = "test-project"


def embedded_postgres_pids(state: Path) -> list[int]:
    """The postgres server processes running on ``state``'s embedded data folder (empty when none runs)."""
    pgdata = str((state / "pgdata").resolve())
    pids = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["name"] == "postgres" and "-D" in cmdline and pgdata in cmdline:
            pids.append(proc.pid)
    return pids


def other_embedded_postgres_users(state: Path) -> list[int]:
    """Live processes other than this one holding a handle on ``state``'s embedded server: embedded_postgres
    records the pid of every process that called get_server (start_embedded_postgres) in the data folder,
    and removes it at that process's exit. Unreadable means unknown: reported as a user (pid 0)."""
    import json

    record = state / "pgdata" / ".handle_pids.json"
    try:
        pids = [int(pid) for pid in json.loads(record.read_text())] if record.exists() else []
    except (OSError, ValueError, TypeError):
        return [0]
    return [pid for pid in pids if pid != os.getpid() and psutil.pid_exists(pid)]


@contextmanager
def embedded_postgres_session(state: Path) -> Iterator[str]:
    """The embedded PostgreSQL for one pytest session. At the end it is stopped only if this session started it
    and no other live process (e.g. a concurrent pytest on the same machine) still holds it; a server found
    running is left running."""
    state.mkdir(parents=True, exist_ok=True)
    with open(state / "pgdata.lock", "w") as lock:  # start and stop decisions, one session at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        started = not embedded_postgres_pids(state)
        uri = start_embedded_postgres(state)
    try:
        yield uri
    finally:
        with open(state / "pgdata.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if started and not other_embedded_postgres_users(state):
                stop_embedded_postgres(state)


@pytest.fixture(scope="session")
def pg_uri() -> Iterator[str]:
    """A real PostgreSQL: BQ_REFRESH_DATABASE_URL if set, else the embedded server (stopped at the session's
    end when the session started it)."""
    url = os.environ.get("BQ_REFRESH_DATABASE_URL")
    if url:
        yield url
        return
    with embedded_postgres_session(TEST_STATE) as uri:
        yield uri


@pytest.fixture
def schema(pg_uri: str) -> Iterator[str]:
    """A fresh schema name for one test (and its staging schema), dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(pg_uri, autocommit=True) as conn:
        for s in (name, f"{name}_staging", f"{name}_shadow"):
            # A schema another role made (a test's least-privilege role) is dropped by a member of that role:
            # the test's own role need not be a superuser (the Supabase-like server's postgres is not).
            owner = conn.execute("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = %s"
                                 " AND NOT pg_has_role(current_user, nspowner, 'USAGE')", (s,)).fetchone()
            if owner:
                conn.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(sql.Identifier(owner[0])))
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(s)))


@pytest.fixture
def pg(pg_uri: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg_uri, autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="session")
def emulator() -> Iterator[EmulatorEndpoints]:
    """The BigQuery emulator as a real process on free ports, for the whole session."""
    state = TEST_STATE / f"emulator-{os.getpid()}"
    endpoints = start_emulator(state, EMULATOR_PROJECT, persistent=False, reuse=False)
    yield endpoints
    stop_emulator(state)


@pytest.fixture
def dataset(emulator: EmulatorEndpoints) -> Iterator[str]:
    """A fresh BigQuery dataset in the emulator for one test."""
    name = f"ds_{uuid.uuid4().hex[:8]}"
    source = BigQuerySource(
        project_id=EMULATOR_PROJECT, dataset=name, api_endpoint=emulator.rest_url,
        storage_endpoint=emulator.grpc_target,
    )
    client = source.get_bigquery_client()
    client.create_dataset(name, exists_ok=True, timeout=30)
    yield name
    client.delete_dataset(name, delete_contents=True, not_found_ok=True, timeout=30)


@pytest.fixture
def settings(pg_uri: str, schema: str, emulator: EmulatorEndpoints, dataset: str, tmp_path: Path) -> Settings:
    """Settings for one test: its own schema and dataset, the emulator and the test database."""
    return Settings.model_validate(
        {
            "BQ_REFRESH_DATABASE_URL": pg_uri,
            "BQ_REFRESH_SCHEMA": schema,
            "BQ_REFRESH_STAGING_SCHEMA": f"{schema}_staging",
            "BQ_REFRESH_STATE_DIR": str(tmp_path / "state"),
            "BIGQUERY_PROJECT_ID": EMULATOR_PROJECT,
            "BIGQUERY_DATASET": dataset,
            "BIGQUERY_API_ENDPOINT": emulator.rest_url,
            "BIGQUERY_STORAGE_ENDPOINT": emulator.grpc_target,
            "BIGQUERY_TIMEOUT_SECONDS": 30,
            "REFRESH_LOCK_WAIT_SECONDS": 2,
        }
    )


@pytest.fixture
def resources(settings: Settings) -> Resources:
    assert settings.database_url is not None
    return Resources(
        source=BigQuerySource.from_settings(settings),
        target=PostgresTarget(url=settings.database_url, session_timeouts=settings.session_timeouts),
        settings=settings,
    )


@pytest.fixture
def source(env: Settings) -> BigQuerySource:
    """The test's BigQuery dataset through the official clients."""
    return BigQuerySource.from_settings(env)


@pytest.fixture
def registry(env: Settings, pg: psycopg.Connection[Any]) -> str:
    """The test's registry schema, migrated."""
    from tasks.migrations import apply_migrations

    apply_migrations(pg, env.schema_name)
    return env.schema_name


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One ephemeral Prefect API for the whole session (it takes 15-30 s to start here)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Put the test's settings into the environment, as a deployment would have them."""
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        value = getattr(settings, name)
        if value is None or not isinstance(alias, str):
            continue
        monkeypatch.setenv(alias, value.get_secret_value() if hasattr(value, "get_secret_value") else str(value))
    return settings


class WebhookReceiver:
    """A real local HTTP server that records what it receives (and can answer errors)."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.received: list[dict[str, Any]] = []
        self.fail_next = 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if receiver.fail_next > 0:
                    receiver.fail_next -= 1
                    self.send_response(503)
                    self.end_headers()
                    return
                receiver.received.append({"headers": dict(self.headers), "body": body, "path": self.path})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def events(self) -> list[str]:
        import json as _json

        return [_json.loads(r["body"])["event"] for r in self.received]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


class TokenServer:
    """A real local HTTP server in the role of Google's OAuth token endpoint, refusing every key
    (invalid_grant), and a service-account key (a fresh RSA key) whose token_uri points at it."""

    PRIVATE_KEY_ID = "bq-refresh-test-key-id-0b7e41"

    def __init__(self) -> None:
        import http.server
        import json as _json
        import threading

        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.calls = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.calls += 1
                body = _json.dumps({"error": "invalid_grant", "error_description": "Invalid JWT Signature."}).encode()
                self.send_response(400)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.private_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()).decode()
        self.key_json = _json.dumps({
            "type": "service_account", "project_id": EMULATOR_PROJECT, "private_key_id": self.PRIVATE_KEY_ID,
            "private_key": self.private_key, "client_email": "refresh@test-project.iam.gserviceaccount.com",
            "client_id": "1", "token_uri": f"http://127.0.0.1:{self.server.server_address[1]}/token",
        })

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def token_server() -> Iterator[TokenServer]:
    server = TokenServer()
    yield server
    server.close()


class OwnEmulator:
    """A BigQuery emulator of one test (persistent data, fixed ports), so the test may kill and restart it;
    the test's environment points at it and its dataset exists."""

    def __init__(self, state: Path, dataset: str, monkeypatch: pytest.MonkeyPatch) -> None:
        from bq_refresh.services import free_port

        self.state = state
        self.ports = {"rest_port": free_port(), "grpc_port": free_port()}
        self.endpoints = self.start()
        monkeypatch.setenv("BIGQUERY_API_ENDPOINT", self.endpoints.rest_url)
        monkeypatch.setenv("BIGQUERY_STORAGE_ENDPOINT", self.endpoints.grpc_target)
        self.source = BigQuerySource(project_id=EMULATOR_PROJECT, dataset=dataset, api_endpoint=self.endpoints.rest_url,
                                     storage_endpoint=self.endpoints.grpc_target)
        self.source.get_bigquery_client().create_dataset(dataset, exists_ok=True)

    def start(self) -> EmulatorEndpoints:
        return start_emulator(self.state, EMULATOR_PROJECT, persistent=True, reuse=False, **self.ports)

    def stop(self) -> None:
        stop_emulator(self.state)


@pytest.fixture
def own_emulator(env: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[OwnEmulator]:
    emu = OwnEmulator(tmp_path / "emu", env.bigquery_dataset, monkeypatch)
    yield emu
    emu.stop()


@pytest.fixture(scope="session")
def supabase_like(pg_uri: str) -> Any:
    """The Supabase-like server (tests/supabase_like.py) this pass runs through, to start more PgBouncers in front of
    it; the test is skipped on any other server."""
    from tests import supabase_like as server_module

    server = server_module.behind(pg_uri)
    if server is None:
        pytest.skip("PgBouncer runs in front of the Supabase-like PostgreSQL 15 (the README's test command's"
                    " second pass); this pass's server is not it")
    return server
