"""Security: secrets never appear in logs, audit rows, alerts, artifacts, API answers or exception text;
the refresh runs as a least-privilege role; tokens and signatures are compared in constant time."""

from __future__ import annotations

import hmac
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, quote_plus, urlsplit, urlunsplit

import psycopg
import pytest
from prefect import flow, get_run_logger
from psycopg import sql

from blocks import BigQuerySource
from bq_refresh.redact import redact
from bq_refresh.services import free_port
from bq_refresh.settings import Settings
from flows.daily_refresh import daily_refresh, night_summary
from flows.refresh_table import refresh_table
from tasks.migrations import apply_migrations
from tasks.registry import register_table
from tasks.roles import least_privilege_sql
from tests.bqdata import assert_same_rows, pg_rows, put_table, source_rows
from tests.conftest import ROOT, TokenServer, WebhookReceiver
from tests.test_engine import SQP_KEY, SQP_SCHEMA, sqp_rows

pytestmark = [pytest.mark.emulator, pytest.mark.usefixtures("prefect_harness")]


def as_user(uri: str, user: str, password: str | None = None) -> str:
    parts = urlsplit(uri)
    host = parts.hostname or "127.0.0.1"
    auth = quote(user) + (":" + quote(password, safe="") if password else "")
    netloc = f"{auth}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@pytest.fixture
def login_role(pg: psycopg.Connection[Any]) -> Iterator[tuple[str, str]]:
    """A login role with a password (checked by servers with scram, e.g. the Supabase-like one; carried only by
    those that trust local logins).
    The password changes under percent-encoding ('@', '/', '%', ':', ' ', '+'), as a URI carries it."""
    name, password = f"r_{uuid.uuid4().hex[:8]}", f"p@ss/w0rd %{uuid.uuid4().hex}:+Secret!"
    pg.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(name), sql.Literal(password)))
    yield name, password
    # Without superuser (Supabase's postgres) dropping another role's objects needs its membership; granted only
    # now, so the test itself sees what an administrator without it would.
    pg.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(sql.Identifier(name)))
    pg.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(name)))
    pg.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def test_the_refresh_runs_as_a_least_privilege_role(
    env: Settings, pg: psycopg.Connection[Any], pg_uri: str, login_role: tuple[str, str], webhook: WebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    schema, role = env.schema_name, login_role[0]
    app = f"{schema}_app"
    pg.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(app)))
    try:
        apply_migrations(pg, schema)  # the administrator's part
        source = BigQuerySource.from_settings(env)
        put_table(source, "sqp", SQP_SCHEMA, sqp_rows(300))
        spec = {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"}
        register_table(pg, schema, f"{app}.fresh", spec)  # created by the role's first run
        register_table(pg, schema, f"{app}.existing", spec)  # made by someone else, granted by the script
        pg.execute(sql.SQL("CREATE TABLE {} (start_date date, asin text, search_query text, impressions bigint,"
                           " click_share numeric(38,9), median_price numeric(38,9), updated_at timestamptz,"
                           " PRIMARY KEY (start_date, asin, search_query))").format(sql.Identifier(app, "existing")))
        pg.execute(sql.SQL("CREATE TABLE {} (secret text)").format(sql.Identifier(app, "private")))
        pg.execute(sql.SQL("INSERT INTO {} VALUES ('untouchable')").format(sql.Identifier(app, "private")))

        # The command itself, as an administrator runs it (its function alone once hid a crash of the command).
        made = subprocess.run([sys.executable, "-m", "flows.cli", "role-sql", "--role", role], cwd=ROOT,
                              env={**os.environ, "COLUMNS": "200"}, capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stderr[-3000:]
        script = made.stdout
        assert script == least_privilege_sql(pg, schema, env.staging_schema, role)
        assert "SUPERUSER" not in script.replace("NOSUPERUSER", "") and "PASSWORD" not in script
        assert '"private"' not in script
        pg.execute(script.encode())
        # Registered after the script ran: not granted, so the role is refused, clearly.
        register_table(pg, schema, f"{app}.not_granted", spec)
        pg.execute(sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL)").format(
            sql.Identifier(app, "not_granted"), sql.Identifier(app, "existing")))

        role_uri = as_user(pg_uri, role, login_role[1])
        monkeypatch.setenv("BQ_REFRESH_DATABASE_URL", role_uri)
        monkeypatch.setenv("REFRESH_WEBHOOK_URL", webhook.url)
        with psycopg.connect(role_uri, autocommit=True) as mine:
            assert mine.execute("SELECT rolsuper, rolcreaterole, rolcreatedb, rolbypassrls FROM pg_roles"
                                " WHERE rolname = current_user").fetchone() == (False, False, False, False)

        state = daily_refresh(force=True, return_state=True)
        tables = {t["table"]: t for t in night_summary(state)["tables"]}
        for name in ("fresh", "existing"):
            assert tables[f"{app}.{name}"]["status"] == "success", tables
            assert_same_rows(source_rows(source, "sqp"), pg_rows(pg, f'"{app}".{name}', "1"), SQP_KEY)
        failed = tables[f"{app}.not_granted"]
        # Refused by PostgreSQL (no grant) or, where row-level security is on for new tables (Supabase-like), before
        # anything is written because no policy gives the role every row.
        assert failed["status"] == "failed" and "not_granted" in failed["error"]
        assert "permission denied" in failed["error"] or "no policy gives" in failed["error"], failed
        row = pg.execute(f'SELECT status, error_message FROM "{schema}".refresh_audit_log WHERE table_name = %s',
                         ("not_granted",)).fetchone()
        assert row is not None and row[0] == "failed" and ("permission denied" in row[1] or "no policy gives" in row[1])
        assert any(json.loads(r["body"])["table"] == f"{app}.not_granted" for r in webhook.received)
        owner = pg.execute("SELECT tableowner FROM pg_tables WHERE schemaname = %s AND tablename = 'fresh'", (app,)).fetchone()
        assert owner == (role,)

        with psycopg.connect(role_uri, autocommit=True) as mine:
            for statement in (sql.SQL("UPDATE {} SET secret = 'x'").format(sql.Identifier(app, "private")),
                              sql.SQL("SELECT * FROM {}").format(sql.Identifier(app, "private")),
                              sql.SQL("DROP TABLE {}").format(sql.Identifier(app, "existing")),
                              sql.SQL("CREATE ROLE {}").format(sql.Identifier(role + "_x"))):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    mine.execute(statement)
        assert pg.execute(sql.SQL("SELECT secret FROM {}").format(sql.Identifier(app, "private"))).fetchall() == [("untouchable",)]
    finally:
        pg.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(app)))


def encodings(value: str) -> dict[str, str]:
    """A secret as text can carry it: raw, and percent-encoded as in a URI's path, user info or a form."""
    return {"raw": value, "quote": quote(value), "quote safe=''": quote(value, safe=""), "quote_plus": quote_plus(value)}


# Every table the product writes in its schema; the test fails if one is missing (a renamed table must not
# silently drop out of the search).
PRODUCT_TABLES = ("refresh_config", "refresh_audit_log", "refresh_dependencies", "refresh_data_quality",
                  "refresh_checkpoints", "refresh_quarantine", "refresh_alerts", "materialized_view_refresh_status",
                  "schema_migrations")


@flow(name="secrets-scan-canary")
def canary_flow(text: str) -> None:
    """Logs a value the scan must find: proof that it reads this test's runs' logs and matches encodings."""
    get_run_logger().info("canary %s", quote(text, safe=""))


def _table_texts(pg: psycopg.Connection[Any], schema: str, staging: str) -> list[str]:
    """Every row of every table in the schema and its staging schema, as text; the product's tables must exist."""
    tables = pg.execute("SELECT schemaname, tablename FROM pg_tables WHERE schemaname IN (%s, %s)",
                        (schema, staging)).fetchall()
    missing = set(PRODUCT_TABLES) - {t for s, t in tables if s == schema}
    assert not missing, f"tables the scan means to search do not exist in {schema}: {sorted(missing)}"
    texts: list[str] = []
    for table in tables:
        texts += [r[0] for r in pg.execute(sql.SQL("SELECT t::text FROM {} t").format(sql.Identifier(*table)))]
    return texts


def _prefect_texts(tag: str) -> tuple[int, list[str]]:
    """Every log line and artifact of the flow runs tagged ``tag`` (this test's runs and their subflows),
    read page by page until exhausted; returns the number of runs and the texts. Fails if a run has no log
    in the API (then its logs were never searched)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterTags,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.client.schemas.sorting import LogSort
    from prefect.logging.handlers import APILogHandler

    async def paged(read: Any) -> list[Any]:
        out: list[Any] = []
        while page := await read(offset=len(out), limit=200):
            out += page
        return out

    async def collect() -> tuple[int, list[str]]:
        await APILogHandler.aflush()  # the logs still queued in this process
        async with get_client() as client:
            runs = await paged(lambda **page: client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])), **page))
            ids = [r.id for r in runs]
            logs = await paged(lambda **page: client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)), sort=LogSort.TIMESTAMP_DESC, **page))
            artifacts = await paged(lambda **page: client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)), **page))
        logged = {log.flow_run_id for log in logs}
        silent = [r.name for r in runs if r.id not in logged]
        assert not silent, f"flow runs without logs in the Prefect API: {silent}"
        return len(runs), [log.message for log in logs] + [json.dumps(a.data, default=str) for a in artifacts]

    import asyncio

    return asyncio.run(collect())


@pytest.mark.once
def test_secrets_never_leave_the_process(
    env: Settings, pg: psycopg.Connection[Any], pg_uri: str, login_role: tuple[str, str], webhook: WebhookReceiver,
    token_server: TokenServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    from fastapi.testclient import TestClient
    from prefect import tags

    from flows.api import create_app

    caplog.set_level(logging.DEBUG)
    schema = env.schema_name
    role, password = login_role
    pg.execute(sql.SQL("GRANT ALL ON DATABASE {} TO {}").format(
        sql.Identifier(str(pg.execute("SELECT current_database()").fetchone()[0])), sql.Identifier(role)))  # type: ignore[index]
    pg.execute(sql.SQL("ALTER ROLE {} SUPERUSER").format(sql.Identifier(role)))  # here only the password matters
    webhook_secret, api_token = f"whsec-{uuid.uuid4().hex}", f"tok-{uuid.uuid4().hex}"
    pem_middle = token_server.private_key.splitlines()[5]
    secrets = {"database password": password, "webhook secret": webhook_secret, "API token": api_token,
               "private key": pem_middle, "private key id": TokenServer.PRIVATE_KEY_ID}
    monkeypatch.setenv("BQ_REFRESH_DATABASE_URL", as_user(pg_uri, role, password))
    monkeypatch.setenv("REFRESH_WEBHOOK_URL", webhook.url)
    monkeypatch.setenv("REFRESH_WEBHOOK_SECRET", webhook_secret)
    monkeypatch.setenv("REFRESH_API_TOKEN", api_token)
    monkeypatch.setenv("REFRESH_RETRY_DELAY_SECONDS", "0.1")
    texts: list[str] = []
    run_tag = f"secrets-scan-{uuid.uuid4().hex}"  # finds this test's flow runs (and subflows) in the Prefect API

    apply_migrations(pg, schema)
    source = BigQuerySource.from_settings(env)
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(100))
    register_table(pg, schema, "good", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})
    register_table(pg, schema, "bad", {"source": "missing", "key": SQP_KEY, "cursor": "updated_at"})
    with tags(run_tag):
        state = daily_refresh(return_state=True)  # a success, a failure, alerts, artifacts
        texts.append(json.dumps(night_summary(state), default=str))

        # The wrong service-account key: the official client's token exchange fails.
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS_JSON", token_server.key_json)
        with pytest.raises(Exception) as credentials_failure:
            refresh_table("good", full_refresh=True)
        texts += [str(credentials_failure.value), repr(credentials_failure.value)]
        monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS_JSON")

        # The database unreachable with the password in the URI.
        monkeypatch.setenv("BQ_REFRESH_DATABASE_URL", f"postgresql://{role}:{quote(password, safe='')}@127.0.0.1:{free_port()}/x")
        with pytest.raises(Exception) as db_failure:
            refresh_table("good")
        texts += [str(db_failure.value), repr(db_failure.value)]
        canary = f"canary @/% {uuid.uuid4().hex}"
        canary_flow(canary)
    monkeypatch.setenv("BQ_REFRESH_DATABASE_URL", as_user(pg_uri, role, password))

    # The API: answers, and a wrong token is refused without being echoed.
    api = TestClient(create_app())
    auth = {"Authorization": f"Bearer {api_token}"}
    for path in ("/health", "/status", "/history", "/metrics", "/metrics/prometheus", "/config"):
        texts.append(api.get(path, headers=auth).text)
    refused = api.put("/config", json={"table": "good", "priority": 5}, headers={"Authorization": f"Bearer {api_token}x"})
    assert refused.status_code == 401
    texts.append(refused.text)

    texts += _table_texts(pg, schema, env.staging_schema)
    texts += [r["body"].decode() + json.dumps(r["headers"]) for r in webhook.received]
    texts += [record.getMessage() + (record.exc_text or "") for record in caplog.records]
    runs, prefect_texts = _prefect_texts(run_tag)
    texts += prefect_texts

    # The daily run, its two subflows, the two failing runs and the canary; what they logged was read.
    assert runs >= 6, runs
    assert [how for how, form in encodings(canary).items() if form in "\n".join(prefect_texts)] == ["quote safe=''"]
    assert len(webhook.received) >= 2 and any("credentials rejected" in t for t in texts)
    assert any("credentials rejected" in t for t in prefect_texts) and any("missing" in t for t in prefect_texts)
    everything = "\n".join(texts)
    assert quote(password, safe="") != password != quote_plus(password)  # the encoded forms are searched too
    leaks = [f"{what} ({how})" for what, value in secrets.items() for how, form in encodings(value).items()
             if form in everything]
    assert not leaks, f"secrets found in the output: {leaks}"


@pytest.mark.once
def test_redaction_masks_uri_passwords_keys_and_known_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFRESH_API_TOKEN", "tok-abcdef123456")
    text = ('connect postgresql://app:p%40ss-w0rd@db:5432/x failed; token tok-abcdef123456; '
            '{"private_key": "-----BEGIN PRIVATE KEY-----\\nMIIEv...\\n-----END PRIVATE KEY-----\\n"}')
    out = redact(text)
    assert "p%40ss-w0rd" not in out and "tok-abcdef123456" not in out and "MIIEv" not in out
    assert "postgresql://app:***@db:5432/x" in out


@pytest.mark.once
def test_tokens_and_signatures_are_compared_in_constant_time(
    settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The API's bearer check and the webhook signature check go through hmac.compare_digest."""
    from fastapi.testclient import TestClient
    from pydantic import SecretStr

    import flows.api
    import tasks.alerts

    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(flows.api.hmac, "compare_digest", spy)
    api = TestClient(create_app_with_token(settings.model_copy(update={"api_token": SecretStr("t0ken-value")})))
    assert api.put("/config", json={}, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert calls and calls[-1][1] == b"Bearer t0ken-value"
    body = b'{"event": "x"}'
    good = tasks.alerts.sign(body, "s3cret")
    assert tasks.alerts.verify(body, "s3cret", good) and not tasks.alerts.verify(body, "s3cret", good[:-1] + "0")
    assert len(calls) >= 3


def create_app_with_token(settings: Settings) -> Any:
    from flows.api import create_app

    return create_app(settings)
