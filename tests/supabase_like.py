"""A Supabase-like PostgreSQL 15 for the test suite, started from the project's own files.

What makes it Supabase-like (issue 17):
- TLS with a self-signed CA and a server certificate for localhost / 127.0.0.1 (``sslmode=require`` and
  ``verify-full`` both work); the server refuses TCP connections without TLS.
- The cluster's superuser is ``supabase_admin``; the refresh and the tests log in as ``postgres``, a
  NOSUPERUSER NOBYPASSRLS role with a scram password, CREATE on the database, CREATEROLE, ``pg_monitor`` and
  ``pg_signal_backend``, owner of the schema ``sqp``; ``anon`` and ``authenticated`` exist (NOLOGIN).
- Role-level statement timeouts: ``postgres`` (configurable, default 8 s), ``authenticated`` 8 s, ``anon`` 3 s.
- Row-level security on every new table: an event trigger (the superuser's) enables RLS and adds a permissive
  SELECT policy for ``authenticated`` on each table created outside the system schemas and the product's
  ``*_staging`` schemas. The owner (``postgres``) is not subject to it, as on Supabase.
- PgBouncer in front, in session mode (the stand-in for Supavisor's session pooler): TLS to the server
  (``server_tls_sslmode=require``), TLS offered to clients, scram auth through an ``auth_query`` as
  Supabase's poolers do. ``PgBouncer`` starts more of them (e.g. transaction mode, a pool of 1) in front of
  the same server.

CLI (what ``./dev`` calls): ``python -m tests.supabase_like start`` prints the URI the suite uses;
``python -m tests.supabase_like stop`` stops PgBouncer and the server.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
# BQ_REFRESH_SUPABASE_LIKE_STATE: another state folder (a second server beside the one ./dev test starts)
DEFAULT_STATE = Path(os.environ.get("BQ_REFRESH_SUPABASE_LIKE_STATE") or ROOT / ".state" / "supabase-pg15").resolve()
RECORD = "supabase-like.json"
BINDIR = Path("/usr/lib/postgresql/15/bin")

ADMIN_ROLE = "supabase_admin"  # the cluster's superuser
APP_ROLE = "postgres"  # what the refresh and the tests log in as: no superuser, like Supabase's
AUTH_ROLE = "pgbouncer"  # the pooler's auth_query role
DATABASE = "postgres"
OS_USER = "postgres"  # PostgreSQL and PgBouncer refuse to run as root
# Schemas the RLS trigger leaves alone: the catalogs, this module's own, and the product's staging schemas
# (their tables are the refresh's scratch space, never read by dashboard roles).
RLS_SKIPPED = ("pg_catalog", "information_schema", "pg_toast", "supabase_like", AUTH_ROLE)


@dataclass(frozen=True)
class TlsFiles:
    """A self-signed CA and the server certificate (localhost, 127.0.0.1, ::1) it signed."""

    ca: str
    cert: str
    key: str


def _runas() -> list[str]:
    """The prefix that runs a server program as the ``postgres`` OS user when we are root."""
    if os.getuid() != 0:
        return []
    try:
        pwd.getpwnam(OS_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", OS_USER], check=True)
    return ["runuser", "-u", OS_USER, "--"]


def _own(*paths: Path) -> None:
    """Hand files and folders to the server's OS user (only when we are root)."""
    if os.getuid() == 0:
        for path in paths:
            shutil.chown(path, OS_USER, OS_USER)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_tls(folder: Path) -> TlsFiles:
    """Create a CA and a server certificate for localhost / 127.0.0.1 / ::1 signed by it, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-new", "-nodes", "-newkey", "rsa:2048", "-sha256", "-days", "3650",
             "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=bq-refresh test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=folder)
    _openssl("req", "-new", "-nodes", "-newkey", "rsa:2048", "-sha256", "-keyout", "server.key",
             "-out", "server.csr", "-subj", "/CN=localhost", cwd=folder)
    (folder / "server.ext").write_text(
        "basicConstraints = CA:FALSE\nkeyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth\nsubjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-set_serial", "0x" + secrets.token_hex(8), "-days", "825", "-sha256", "-extfile", "server.ext",
             "-out", "server.crt", cwd=folder)
    key = folder / "server.key"
    key.chmod(0o600)  # PostgreSQL refuses a key others can read
    _own(folder, *folder.iterdir())
    return TlsFiles(ca=str(folder / "ca.crt"), cert=str(folder / "server.crt"), key=str(key))


def free_port() -> int:
    from bq_refresh.services import free_port as product_free_port

    return product_free_port()


def pgbouncer_binary() -> str:
    """The PgBouncer program (Debian installs it in /usr/sbin, which is not on every user's PATH)."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise RuntimeError("pgbouncer is not installed (apt-get install -y pgbouncer; ./dev does it as root)")
    return found


def _wait_for_port(port: int, what: str, log: Path, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise RuntimeError(f"{what} does not answer on port {port} after {timeout_s:.0f} s: {tail}")


def uri(port: int, *, user: str, password: str, sslmode: str = "require", sslrootcert: str | None = None,
        database: str = DATABASE, host: str = "127.0.0.1") -> str:
    """A libpq URI (password percent-encoded) for ``user`` at ``host:port``."""
    query = {"sslmode": sslmode} | ({"sslrootcert": sslrootcert} if sslrootcert else {})
    return (f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/{database}?"
            + urlencode(query, safe="/"))


@dataclass
class PgBouncer:
    """One PgBouncer process in front of the Supabase-like server: its folder (config, auth file, log, pid)
    is reachable by the server's OS user. ``pool_mode`` "session" (Supavisor's session pooler) or "transaction"
    (its transaction pooler, which breaks session state)."""

    folder: Path
    server_port: int
    tls: TlsFiles
    auth_password: str  # the auth_query role's password (PgBouncer logs in with it to look up the others)
    stats_secrets: dict[str, str] = field(default_factory=dict)  # role -> scram secret, for the admin console
    pool_mode: str = "session"
    default_pool_size: int = 100
    max_client_conn: int = 1000
    client_tls_sslmode: str = "prefer"  # TLS offered; a test's byte-level proxy may still speak plain
    ignore_startup_parameters: tuple[str, ...] = ("extra_float_digits",)
    port: int = 0

    @property
    def pidfile(self) -> Path:
        return self.folder / "pgbouncer.pid"

    @property
    def log(self) -> Path:
        return self.folder / "pgbouncer.log"

    def config(self) -> str:
        stats = ", ".join(self.stats_secrets)
        return "\n".join([
            "[databases]",
            f"* = host=127.0.0.1 port={self.server_port}",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "auth_type = scram-sha-256",
            f"auth_file = {self.folder / 'userlist.txt'}",
            f"auth_user = {AUTH_ROLE}",
            f"auth_query = SELECT username, password FROM {AUTH_ROLE}.get_auth($1)",
            f"pool_mode = {self.pool_mode}",
            f"default_pool_size = {self.default_pool_size}",
            f"max_client_conn = {self.max_client_conn}",
            "server_reset_query = DISCARD ALL",
            f"ignore_startup_parameters = {', '.join(self.ignore_startup_parameters)}",
            f"client_tls_sslmode = {self.client_tls_sslmode}",
            f"client_tls_cert_file = {self.tls.cert}",
            f"client_tls_key_file = {self.tls.key}",
            f"client_tls_ca_file = {self.tls.ca}",
            "server_tls_sslmode = require",
            f"stats_users = {stats}" if stats else "",
            f"logfile = {self.log}",
            f"pidfile = {self.pidfile}",
            "",
        ])

    def start(self) -> int:
        """Start PgBouncer (daemonized, as the server's OS user); return its port."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        users = [f'"{AUTH_ROLE}" "{self.auth_password}"'] + [f'"{r}" "{s}"' for r, s in self.stats_secrets.items()]
        (self.folder / "userlist.txt").write_text("\n".join(users) + "\n")
        (self.folder / "userlist.txt").chmod(0o600)
        (self.folder / "pgbouncer.ini").write_text(self.config())
        _own(self.folder, *self.folder.iterdir())
        subprocess.run([*_runas(), pgbouncer_binary(), "-d", str(self.folder / "pgbouncer.ini")], check=True,
                       capture_output=True, timeout=60)
        _wait_for_port(self.port, "PgBouncer", self.log)
        return self.port

    def stop(self) -> None:
        """Stop it at once (SIGTERM: PgBouncer's immediate shutdown) and wait until it is gone."""
        stop_pgbouncer(self.folder)


def stop_pgbouncer(folder: Path) -> None:
    """Stop the PgBouncer whose pid file is in ``folder``, if it runs."""
    try:
        pid = int((folder / "pgbouncer.pid").read_text().strip())
        if Path(f"/proc/{pid}/comm").read_text().strip() != "pgbouncer":  # a stale pid file, its pid reused
            return
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


@dataclass
class SupabaseLike:
    """The server: its state folder, ports, passwords and TLS files (recorded in ``RECORD``, mode 600)."""

    state: str
    server_port: int = 0
    pooler_port: int = 0
    socket_dir: str = ""
    password: str = ""  # the postgres role's
    admin_password: str = ""
    auth_password: str = ""
    statement_timeout: str = "8s"
    default_pool_size: int = 100
    tls: TlsFiles | None = None

    @property
    def data(self) -> Path:
        return Path(self.state) / "data"

    def uri(self, *, port: int | None = None, user: str = APP_ROLE, password: str | None = None,
            sslmode: str = "require") -> str:
        """The URI for ``user`` through the session pooler (or another ``port``); verify-full adds the CA."""
        assert self.tls is not None
        return uri(port or self.pooler_port, user=user, password=self.password if password is None else password,
                   sslmode=sslmode, sslrootcert=self.tls.ca if sslmode in ("verify-ca", "verify-full") else None)

    def direct_uri(self, **kwargs: Any) -> str:
        """The URI straight to the server, bypassing PgBouncer."""
        return self.uri(port=self.server_port, **kwargs)

    def admin(self) -> psycopg.Connection[Any]:
        """A superuser session over the server's Unix socket (trusted for the superuser only)."""
        return psycopg.connect(host=self.socket_dir, port=self.server_port, user=ADMIN_ROLE, dbname=DATABASE,
                               autocommit=True)

    def pgbouncer(self, name: str, *, pool_mode: str = "session", default_pool_size: int = 100,
                  **options: Any) -> PgBouncer:
        """A PgBouncer (not started) in front of this server, in ``state/pgbouncer-<name>``."""
        assert self.tls is not None
        return PgBouncer(Path(self.state) / f"pgbouncer-{name}", self.server_port, self.tls, self.auth_password,
                         stats_secrets={APP_ROLE: self._secret(APP_ROLE)}, pool_mode=pool_mode,
                         default_pool_size=default_pool_size, **options)

    # -- life cycle -------------------------------------------------------------------------------------------

    def start(self) -> str:
        """Create and start the cluster and its session pooler from nothing; return the suite's URI."""
        root = Path(self.state)
        stop(root)
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        _own(root)
        self.server_port = free_port()
        self.socket_dir = str(root / "run")
        if len(self.socket_dir) + len(f"/.s.PGSQL.{self.server_port}") > 100:  # Unix socket paths are short
            self.socket_dir = tempfile.mkdtemp(prefix="bqr-supa-")
        Path(self.socket_dir).mkdir(exist_ok=True)
        _own(Path(self.socket_dir))
        self.password, self.admin_password, self.auth_password = (secrets.token_urlsafe(18) for _ in range(3))
        self.tls = make_tls(root / "tls")
        self._save()
        self._init_cluster()
        self._pg_ctl("-l", str(root / "server.log"), "-w", "-t", "60", "start")
        self._set_up_roles()
        pooler = PgBouncer(root / "pgbouncer-session", self.server_port, self.tls, self.auth_password,
                           stats_secrets={APP_ROLE: self._secret(APP_ROLE)}, default_pool_size=self.default_pool_size)
        self.pooler_port = pooler.start()
        self._save()
        with psycopg.connect(self.uri(sslmode="verify-full"), connect_timeout=10) as conn:
            conn.execute("SELECT 1")
        return self.uri()

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run([*_runas(), str(BINDIR / "pg_ctl"), "-D", str(self.data), *args], check=True,
                       capture_output=True, timeout=120)

    def _init_cluster(self) -> None:
        subprocess.run([*_runas(), str(BINDIR / "initdb"), "-D", str(self.data), "-U", ADMIN_ROLE, "-E", "UTF8",
                        "--locale=C.UTF-8", "--auth-local=trust", "--auth-host=scram-sha-256"],
                       check=True, capture_output=True, timeout=300)
        assert self.tls is not None
        settings = {
            "listen_addresses": "'127.0.0.1'", "port": str(self.server_port),
            "unix_socket_directories": f"'{self.socket_dir}'", "max_connections": "300",
            "password_encryption": "'scram-sha-256'", "ssl": "on", "ssl_cert_file": f"'{self.tls.cert}'",
            "ssl_key_file": f"'{self.tls.key}'", "ssl_ca_file": f"'{self.tls.ca}'",
        }
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n# tests/supabase_like.py\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
        # The superuser over the Unix socket only; everyone over TCP with TLS and a scram password.
        (self.data / "pg_hba.conf").write_text(
            f"local all {ADMIN_ROLE} trust\n"
            "local all all reject\n"
            "hostssl all all 127.0.0.1/32 scram-sha-256\n"
            "hostssl all all ::1/128 scram-sha-256\n"
            "host all all all reject\n")

    def _set_up_roles(self) -> None:
        p = sql.Literal
        statements: list[sql.SQL | sql.Composed] = [
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(ADMIN_ROLE), p(self.admin_password)),
            # Supabase's postgres: no superuser; may create roles; reads the statistics and settings.
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} NOSUPERUSER NOBYPASSRLS CREATEROLE NOCREATEDB NOREPLICATION"
                    ).format(sql.Identifier(APP_ROLE), p(self.password)),
            sql.SQL("GRANT pg_monitor, pg_signal_backend TO {}").format(sql.Identifier(APP_ROLE)),
            sql.SQL("GRANT ALL ON DATABASE {} TO {} WITH GRANT OPTION").format(sql.Identifier(DATABASE),
                                                                               sql.Identifier(APP_ROLE)),
            sql.SQL("GRANT ALL ON SCHEMA public TO {} WITH GRANT OPTION").format(sql.Identifier(APP_ROLE)),
            sql.SQL("CREATE SCHEMA sqp AUTHORIZATION {}").format(sql.Identifier(APP_ROLE)),
            sql.SQL("CREATE ROLE anon NOLOGIN NOINHERIT"),
            sql.SQL("CREATE ROLE authenticated NOLOGIN NOINHERIT"),
            sql.SQL("GRANT anon, authenticated TO {}").format(sql.Identifier(APP_ROLE)),
            sql.SQL("GRANT USAGE ON SCHEMA public, sqp TO anon, authenticated"),
            sql.SQL("ALTER ROLE anon SET statement_timeout = '3s'"),
            sql.SQL("ALTER ROLE authenticated SET statement_timeout = '8s'"),
            sql.SQL("ALTER ROLE {} SET statement_timeout = {}").format(sql.Identifier(APP_ROLE),
                                                                     p(self.statement_timeout)),
            # The pooler's auth_query, as Supabase's: a function only the pooler's role may call.
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(AUTH_ROLE), p(self.auth_password)),
            sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(AUTH_ROLE)),
            sql.SQL("""CREATE FUNCTION {}.get_auth(p_usename text) RETURNS TABLE (username text, password text)
                       LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS
                       $$ SELECT rolname::text, rolpassword FROM pg_authid
                          WHERE rolname = p_usename AND rolcanlogin AND NOT rolsuper $$""").format(
                sql.Identifier(AUTH_ROLE)),
            sql.SQL("REVOKE ALL ON FUNCTION {}.get_auth(text) FROM PUBLIC").format(sql.Identifier(AUTH_ROLE)),
            sql.SQL("GRANT USAGE ON SCHEMA {0} TO {0}").format(sql.Identifier(AUTH_ROLE)),
            sql.SQL("GRANT EXECUTE ON FUNCTION {0}.get_auth(text) TO {0}").format(sql.Identifier(AUTH_ROLE)),
            # Row-level security on every new table outside the system and staging schemas.
            sql.SQL("CREATE SCHEMA supabase_like"),
            sql.SQL("""CREATE FUNCTION supabase_like.rls_on_new_tables() RETURNS event_trigger
                       LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
                       DECLARE obj record;
                       BEGIN
                         -- one CREATE TABLE may report its table more than once (constraints, serials)
                         FOR obj IN SELECT DISTINCT d.objid, d.schema_name FROM pg_event_trigger_ddl_commands() d
                                    JOIN pg_class c ON c.oid = d.objid
                                    WHERE d.object_type = 'table' AND c.relpersistence <> 't'
                                      AND NOT EXISTS (SELECT FROM pg_policy p WHERE p.polrelid = d.objid
                                                      AND p.polname = 'authenticated_read')
                         LOOP
                           CONTINUE WHEN obj.schema_name = ANY ({skipped}) OR obj.schema_name LIKE 'pg\\_%'
                                         OR obj.schema_name LIKE '%\\_staging';
                           EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', obj.objid::regclass);
                           EXECUTE format('CREATE POLICY authenticated_read ON %s FOR SELECT TO authenticated'
                                          ' USING (true)', obj.objid::regclass);
                         END LOOP;
                       END $$""").format(skipped=sql.Literal(list(RLS_SKIPPED))),
            sql.SQL("CREATE EVENT TRIGGER supabase_like_rls ON ddl_command_end"
                    " WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')"
                    " EXECUTE FUNCTION supabase_like.rls_on_new_tables()"),
        ]
        with self.admin() as conn:
            for statement in statements:
                conn.execute(statement)

    def _secret(self, role: str) -> str:
        with self.admin() as conn:
            row = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role,)).fetchone()
        assert row is not None
        return str(row[0])

    def _save(self) -> None:
        record = Path(self.state) / RECORD
        record.write_text(json.dumps(asdict(self), indent=2))
        record.chmod(0o600)

    def stop(self) -> None:
        """Stop the session pooler, then the server (fast shutdown); the state folder stays for a look."""
        for pooler in sorted(Path(self.state).glob("pgbouncer-*")):
            stop_pgbouncer(pooler)
        if (self.data / "postmaster.pid").exists():
            try:
                self._pg_ctl("-m", "fast", "-w", "stop")
            except subprocess.CalledProcessError:
                pass


def load(state: Path = DEFAULT_STATE) -> SupabaseLike | None:
    """The server recorded in ``state``, if any."""
    try:
        data = json.loads((state / RECORD).read_text())
    except (OSError, ValueError):
        return None
    tls = data.pop("tls")
    return SupabaseLike(**data, tls=TlsFiles(**tls) if tls else None)


def behind(database_url: str, state: Path = DEFAULT_STATE) -> SupabaseLike | None:
    """The Supabase-like server if ``database_url`` points at its session pooler, else None."""
    server = load(state)
    try:
        port = urlsplit(database_url).port
    except ValueError:
        return None
    return server if server is not None and server.pooler_port and port == server.pooler_port else None


def stop(state: Path = DEFAULT_STATE) -> None:
    server = load(state)
    if server is not None:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.supabase_like", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("start", "stop", "uri"))
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE, help="state folder (default %(default)s)")
    parser.add_argument("--statement-timeout", default="8s", help="the postgres role's statement_timeout")
    parser.add_argument("--pool-size", type=int, default=100, help="the session pooler's default_pool_size")
    args = parser.parse_args(argv)
    if args.command == "start":
        server = SupabaseLike(str(args.state.resolve()), statement_timeout=args.statement_timeout,
                              default_pool_size=args.pool_size)
        print(server.start())
    elif args.command == "stop":
        stop(args.state.resolve())
    else:
        found = load(args.state.resolve())
        if found is None:
            raise SystemExit(f"no Supabase-like server recorded in {args.state}")
        print(found.uri())


if __name__ == "__main__":
    main()
