"""The preflight (``bq-refresh doctor``; ``tables add`` runs the source part for the new table): one line per
check, ``ok``, ``warn`` or ``fail``, and the fix when it is not ok.

BigQuery: the identity it sees; for each registered table, that the source exists (its type and location), that
the key, cursor and window columns exist with usable types, and that a read session can be opened (a query source:
a dry run of its query). PostgreSQL: server version, TLS, the role's attributes, ownership of the targets and
row-level security that would hide rows from the refresh, CREATE for the staging schema, the event-trigger right,
the role's own timeouts. The transaction-pooler and disk lines are tasks/preflight.py's and tasks/headroom.py's.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import google.auth.exceptions
import psycopg
from google.api_core import exceptions as gexc

from blocks.resources import Resources
from bq_refresh.errors import RefreshError
from tasks import extract, load
from tasks.partitions import Partitioning, partition_filter
from tasks.registry import RegistryEntry
from tasks.sources import read_route
from tasks.typemap import CURSOR_TYPES

Check = dict[str, str]
MIN_SERVER_VERSION = 130000  # trim_scale (verify's digest) and numeric extract(epoch): PostgreSQL 13


def check(name: str, status: str, message: str) -> Check:
    return {"name": name, "status": status, "message": message}


def line(c: Check) -> str:
    """How the CLI prints a check: never wrapped."""
    return f"{c['status'].upper():<8}{c['name']}: {c['message']}"


# --- BigQuery ------------------------------------------------------------------------------------------------------

def identity(res: Resources) -> Check:
    """Which identity BigQuery sees."""
    if res.settings.uses_emulator:
        return check("bigquery identity", "ok", f"the emulator at {res.settings.bigquery_api_endpoint} (no credentials)")
    try:
        creds = res.source.get_bigquery_client()._credentials
    except Exception as exc:  # noqa: BLE001 -- reported, not raised: the preflight goes on
        return check("bigquery identity", "fail", no_credentials(exc))
    who = getattr(creds, "service_account_email", None) or getattr(creds, "signer_email", None)
    return check("bigquery identity", "ok", f"{who or type(creds).__name__} on project {res.source.project_id}")


def no_credentials(exc: BaseException) -> str:
    """The fix for a BigQuery client that cannot be made: no key found, or one that cannot be read."""
    return (f"no usable credentials ({str(exc).strip().splitlines()[0]}): set GOOGLE_APPLICATION_CREDENTIALS_JSON to a"
            " service account key (or GOOGLE_APPLICATION_CREDENTIALS to its file)")


def bigquery_says(exc: gexc.GoogleAPICallError) -> str:
    """BigQuery's own words for a refused request, on one line (the client's message starts with the URL)."""
    said = next((str(e["message"]) for e in exc.errors or [] if isinstance(e, dict) and e.get("message")), exc.message)
    return " ".join(said.split("\n")[0].split())


def partitioned_by(table: Any) -> str:
    """How the source line names a partitioned table ('' for one that is not)."""
    fields = extract._fields(table.schema)
    partitioning = Partitioning.of(table, {f.name: f.type for f in fields})
    if partitioning is None:
        return ""
    return f", partitioned by {partitioning.column}" + (
        ", a partition filter required (every read carries one)" if partitioning.required else "")


def source_checks(res: Resources, entry: RegistryEntry) -> list[Check]:
    """The source of one registered table: exists (type, location), columns, a read session (or a query's dry run)."""
    name = f"source {entry.name}"
    try:
        spec = entry.spec()
    except RefreshError as exc:
        return [check(name, "fail", str(exc))]
    try:
        client = res.source.get_bigquery_client()
    except google.auth.exceptions.GoogleAuthError as exc:
        return [check(name, "fail", no_credentials(exc))]
    retry = extract.short_retry(res.source.timeout_s)
    budget = spec.maximum_bytes_billed or res.settings.bigquery_maximum_bytes_billed
    if spec.query is not None:
        from google.cloud import bigquery

        try:
            job = client.query(spec.query, job_config=bigquery.QueryJobConfig(dry_run=True, use_query_cache=False),
                               retry=retry, job_retry=None)
        except gexc.GoogleAPICallError as exc:
            return [check(name, "fail", f"the query does not run: {bigquery_says(exc)}: fix it (bq-refresh tables"
                                        f""" set {entry.name} --params '{{"query": "..."}}')""")]
        return [check(name, "ok", f"query source: dry run ok ({int(job.total_bytes_processed or 0)} bytes)"),
                *budget_check(entry.name, "its query", int(job.total_bytes_processed or 0), budget)]
    assert spec.source is not None
    ref = res.source.table_ref(spec.source)
    try:
        table = client.get_table(ref, retry=retry, timeout=res.source.timeout_s)
    except gexc.NotFound:
        return [check(name, "fail", f"{ref} not found in BigQuery: check the table's source (bq-refresh tables set"
                                    f" {entry.name} --source ...)")]
    except gexc.Forbidden as exc:
        return [check(name, "fail", f"permission denied on {ref}: grant the identity roles/bigquery.dataViewer"
                                    f" ({exc.message})")]
    except gexc.GoogleAPICallError as exc:
        return [check(name, "fail", f"{ref}: {exc.message}")]
    kind = table.table_type or "TABLE"
    where = f" in {table.location}" if table.location else ""
    out = []
    external = table.external_data_configuration
    by_query = read_route(kind, connection=bool(external is not None and external.connection_id)) == "query"
    if by_query:  # no read session can read it: a query job does, then its result table is read
        from google.cloud import bigquery

        try:
            dry = client.query(f"SELECT * FROM `{ref}`", job_config=bigquery.QueryJobConfig(  # noqa: S608
                dry_run=True, use_query_cache=False), retry=retry, job_retry=None)
        except gexc.GoogleAPICallError as exc:
            return [check(name, "fail", f"{ref} is a {kind}{where}, read through a query job, which does not run:"
                                        f" {exc.message} (roles/bigquery.jobUser on the project)")]
        out.append(check(name, "ok", f"{ref} is a {kind}{where}, read through a query job (dry run:"
                                     f" {int(dry.total_bytes_processed or 0)} bytes)"))
        out += budget_check(entry.name, "its query", int(dry.total_bytes_processed or 0), budget)
    else:
        out.append(check(name, "ok", f"{ref} is a {kind}{where}, {int(table.num_rows or 0)} rows"
                         + partitioned_by(table)))
    types = {f.name: (f.field_type, f.mode) for f in table.schema}
    fields = extract._fields(table.schema)
    types_of = {f.name: f.type for f in fields}
    problems = []
    unusable = {"FLOAT64", "FLOAT", "JSON", "GEOGRAPHY", "RECORD", "STRUCT"}  # no equality a key or period can rely on
    for role, columns in (("key", spec.key), ("cursor", [spec.cursor] if spec.cursor else []),
                          ("window", [spec.window_column] if spec.window_column else []),
                          ("selected", spec.columns or [])):
        for column in columns:
            if column not in types:
                problems.append(f"{role} column {column!r} not in {ref} (columns: {', '.join(types)})")
                continue
            bq_type, mode = types[column]
            if role in {"key", "window"} and (bq_type in unusable or mode == "REPEATED"):
                problems.append(f"{role} column {column!r} is {bq_type} {mode}: not usable as a {role}")
            elif role == "cursor" and (bq_type not in CURSOR_TYPES or mode == "REPEATED"):
                problems.append(f"cursor column {column!r} is {bq_type}: use a TIMESTAMP, DATETIME, DATE or INT64 column")
    if problems:
        out.append(check(f"columns {entry.name}", "fail", "; ".join(problems)))
        return out
    out.append(check(f"columns {entry.name}", "ok", "key " + ", ".join(spec.key)
                     + (f", cursor {spec.cursor}" if spec.cursor else "")
                     + (f", window {spec.window_column}" if spec.window_column else "") + " exist with usable types"))
    if by_query:
        return out  # its result table exists only once the query has run
    try:
        session = extract.create_session(
            res.source, extract.SourceTable(ref, fields, partition_filter=partition_filter(table, types_of)),
            selected_fields=list(spec.key),
            row_restriction="", snapshot_time=datetime.now(UTC) - timedelta(seconds=1), max_streams=1,
            table_name=entry.name)
    except RefreshError as exc:
        why = str(exc).removeprefix(f"{entry.name}: ")
        out.append(check(f"read session {entry.name}", "fail", f"{why}: grant the identity"
                                                               " roles/bigquery.readSessionUser on the project"))
        return out
    out.append(check(f"read session {entry.name}", "ok", f"opened ({len(session.streams)} stream(s))"))
    if budget is not None:  # what a whole read of the synced columns scans (the session itself is free)
        whole = extract.create_session(
            res.source, extract.SourceTable(ref, fields, partition_filter=partition_filter(table, types_of)),
            selected_fields=list(dict.fromkeys([*(spec.columns or [f.name for f in fields]), *spec.key])),
            row_restriction="", snapshot_time=datetime.now(UTC) - timedelta(seconds=1), max_streams=1,
            table_name=entry.name)
        # a full-mode table reads it all every night; another one on its first load, a full refresh, a backfill
        out += budget_check(entry.name, "a whole read" if spec.mode == "full" else "a whole read (a first load or"
                            " full refresh)", whole.estimated_bytes, budget, severity="fail" if spec.mode == "full"
                            else "warn")
    return out


def budget_check(table: str, what: str, estimate: int, budget: int | None, severity: str = "fail") -> list[Check]:
    """The table's maximum_bytes_billed against BigQuery's estimate (nothing when no budget is set)."""
    if budget is None:
        return []
    if estimate > budget:
        return [check(f"budget {table}", severity, f"{what} would scan {estimate:,} bytes in BigQuery, over"
                                                 f" maximum_bytes_billed {budget:,}: the run would be refused; raise"
                                                 " maximum_bytes_billed or read less (columns, a query)")]
    return [check(f"budget {table}", "ok", f"{what} would scan {estimate:,} bytes, within maximum_bytes_billed"
                                           f" {budget:,}")]


# --- PostgreSQL ----------------------------------------------------------------------------------------------------

def version_check(number: int, version: str) -> Check:
    """The server's version (``server_version_num``, ``server_version``) against the oldest bq-refresh supports."""
    if number >= MIN_SERVER_VERSION:
        return check("postgres version", "ok", f"PostgreSQL {version}")
    return check("postgres version", "fail", f"PostgreSQL {version}: bq-refresh needs 13 or later")


def postgres_checks(conn: psycopg.Connection[Any], *, staging_schema: str, targets: list[tuple[str, str]],
                    session_timeouts: dict[str, int]) -> list[Check]:
    """Server version, TLS, the role, the targets (ownership, row-level security), staging, event triggers, timeouts."""
    out = []
    row = conn.execute("SELECT current_setting('server_version_num')::int, current_setting('server_version'),"
                       " current_user, r.rolsuper, r.rolbypassrls, r.rolcreaterole,"
                       " (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()),"
                       " (SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid()), inet_server_addr() IS NULL"
                       " FROM pg_roles r WHERE r.rolname = current_user").fetchone()
    assert row is not None
    number, version, role, superuser, bypass, createrole, ssl, ssl_version, socket = row
    out.append(version_check(number, version))
    if ssl:
        out.append(check("tls", "ok", f"on ({ssl_version})"))
    elif socket:
        out.append(check("tls", "ok", "a local socket (no TLS needed)"))
    else:
        out.append(check("tls", "warn", "off: the connection is not encrypted; add sslmode=require (or verify-full)"
                                        " to BQ_REFRESH_DATABASE_URL"))
    attributes = [a for a, on in (("superuser", superuser), ("bypassrls", bypass), ("createrole", createrole)) if on]
    out.append(check("role", "warn" if superuser else "ok",
                     f"{role}: superuser: give the refresh a role of its own (bq-refresh role-sql)" if superuser
                     else f"{role}: {', '.join(attributes) or 'no special attributes'}"))
    not_owned, refused = [], []
    for schema, table in targets:
        owned = conn.execute("SELECT pg_has_role(c.relowner, 'USAGE') FROM pg_class c WHERE c.oid = to_regclass(%s)",
                             (f'"{schema}"."{table}"',)).fetchone()
        if owned is None:
            continue  # made by its first run
        if not owned[0]:
            not_owned.append(f"{schema}.{table}")
        why = load.rls_refusal(conn, schema, table)
        if why:
            refused.append(why)
    if refused:
        out.append(check("targets", "fail", " | ".join(refused)))
    elif not_owned:
        out.append(check("targets", "warn", f"{role} does not own {', '.join(not_owned)}: their first load stages"
                                            " (no direct load) and their indexes are never dropped and rebuilt"))
    else:
        out.append(check("targets", "ok", f"{len(targets)} registered target(s): owned or not made yet, row-level"
                                          " security lets the refresh see every row"))
    staging = conn.execute("SELECT to_regnamespace(%s) IS NOT NULL, CASE WHEN to_regnamespace(%s) IS NOT NULL"
                           " THEN has_schema_privilege(%s, 'CREATE') ELSE has_database_privilege(current_database(),"
                           " 'CREATE') END", (staging_schema, staging_schema, staging_schema)).fetchone()
    assert staging is not None
    if staging[1]:
        out.append(check("staging schema", "ok", f"{staging_schema}: {role} may create tables there"
                         if staging[0] else f"{staging_schema} made by the first run ({role} may create schemas)"))
    else:
        fix = (f'GRANT CREATE ON SCHEMA "{staging_schema}" TO "{role}";' if staging[0]
               else f'GRANT CREATE ON DATABASE current database TO "{role}"; (or create schema {staging_schema} owned by it)')
        out.append(check("staging schema", "fail", f"{role} may not create tables in {staging_schema}: {fix}"))
    out.append(check("event trigger", "ok" if superuser else "warn",
                     "may create the auto-registration event trigger" if superuser else
                     f"{role} may not create event triggers (superuser only): tables are registered with bq-refresh"
                     " tables add, not on CREATE TABLE"))
    # The role's and the database's own defaults (pg_settings shows this session's values, which the refresh sets).
    settings = dict(r for r in conn.execute(
        "SELECT split_part(c, '=', 1), split_part(c, '=', 2) FROM pg_db_role_setting s, unnest(s.setconfig) c"
        " WHERE (s.setrole IN (0, (SELECT oid FROM pg_roles WHERE rolname = current_user)))"
        " AND (s.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database())))"
        " AND split_part(c, '=', 1) IN ('statement_timeout', 'lock_timeout', 'idle_in_transaction_session_timeout')"
        " ORDER BY s.setrole DESC, s.setdatabase DESC").fetchall()[::-1])
    own = ", ".join(f"{k} {v} ms" for k, v in session_timeouts.items())
    out.append(check("timeouts", "ok", (f"the role or database sets {', '.join(f'{k}={v}' for k, v in settings.items())};"
                                        if settings else "no role or database timeouts;")
                     + f" every session of the refresh sets its own ({own})"))
    return out
