"""The PostgreSQL target block: a connection URI kept secret; builds psycopg and ADBC connections."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

import adbc_driver_postgresql.dbapi as adbc
import psycopg
from prefect.blocks.core import Block
from prefect_sqlalchemy import ConnectionComponents
from pydantic import Field, SecretStr


class PostgresTarget(Block):
    """The PostgreSQL database (Supabase or any server) the tables are published into."""

    _block_type_name = "bq-refresh PostgreSQL target"

    url: SecretStr | None = Field(
        default=None,
        description="PostgreSQL URI, e.g. postgresql://user:pass@db.xyz.supabase.co:5432/postgres.",
    )
    connection_info: ConnectionComponents | None = Field(
        default=None,
        description="prefect-sqlalchemy ConnectionComponents (a PostgreSQL driver, host, port, database, username, "
                    "password, query e.g. sslmode), used when url is empty.",
    )
    application_name: str = Field(default="bq-refresh", description="Shown in pg_stat_activity.")
    session_timeouts: dict[str, int] = Field(
        default_factory=dict,
        description="Settings (ms) every session sets for itself, e.g. statement_timeout: a role's defaults "
                    "(Supabase sets statement timeouts per role) must not end the refresh's own statements. "
                    "A value the URI sets in its options (-c name=value) is kept.")

    def uri(self) -> str:
        """Return the connection URI (a secret: never log it)."""
        if self.url is not None:
            return self.url.get_secret_value()
        if self.connection_info is not None:
            return components_uri(self.connection_info)
        raise ValueError("PostgresTarget needs url or connection_info")

    def connect(self, *, autocommit: bool = False) -> psycopg.Connection[Any]:
        """Open a psycopg connection (transactions explicit unless autocommit), with the session's timeouts."""
        conn = psycopg.connect(self.uri(), autocommit=autocommit, application_name=self.application_name)
        if self.session_timeouts:
            try:
                conn.execute(_set_timeouts_sql(self.session_timeouts).encode())
                if not autocommit:
                    conn.commit()  # a session setting made inside a transaction that rolls back would be undone
            except BaseException:
                conn.close()
                raise
        return conn

    def connect_adbc(self) -> adbc.Connection:
        """Open an ADBC connection for bulk COPY (autocommit off), named like the others in pg_stat_activity,
        with the session's timeouts."""
        uri = self.uri()
        if uri.startswith(("postgresql://", "postgres://")) and "application_name=" not in uri:
            uri += ("&" if "?" in uri else "?") + "application_name=" + quote(self.application_name)
        conn = adbc.connect(uri)
        if self.session_timeouts:
            try:
                with conn.cursor() as cur:
                    cur.execute(_set_timeouts_sql(self.session_timeouts))
                    cur.fetchall()
                conn.commit()
            except BaseException:
                conn.close()
                raise
        return conn


def components_uri(c: ConnectionComponents) -> str:
    """The libpq URI of prefect-sqlalchemy's ConnectionComponents, each part percent-encoded (SQLAlchemy's own
    rendering leaves a space in a password as it is, and names its driver in the scheme, which libpq refuses).

    Raises:
        ValueError: a driver that is not PostgreSQL's.
    """
    driver = str(getattr(c.driver, "value", c.driver))
    if driver.split("+")[0] not in {"postgresql", "postgres"}:
        raise ValueError(f"PostgresTarget connection_info: driver {driver} is not PostgreSQL's")
    user = quote(c.username or "", safe="")
    password = c.password.get_secret_value() if c.password is not None else ""
    auth = f"{user}{':' + quote(password, safe='') if password else ''}@" if user else ""
    host = quote(c.host or "", safe="")
    port = f":{c.port}" if c.port else ""
    query = urlencode(c.query, quote_via=quote) if c.query else ""  # %20, not '+': libpq does not read '+' as a space
    return f"postgresql://{auth}{host}{port}/{quote(c.database, safe='')}" + (f"?{query}" if query else "")


def _set_timeouts_sql(timeouts: dict[str, int]) -> str:
    """One statement (one round trip, no parameters: ADBC and psycopg alike) setting each timeout for the session,
    and its TimeZone to UTC (whatever a role or the server sets: an implicit timestamptz cast never depends on it);
    a setting the client gave at connection time (the URI's options, pg_settings.source 'client') is left as it is."""
    for name in timeouts:
        if not name.replace("_", "").isalpha():
            raise ValueError(f"not a PostgreSQL setting name: {name!r}")
    values = ", ".join([*(f"('{name}', '{int(ms)}ms')" for name, ms in timeouts.items()), "('TimeZone', 'UTC')"])
    return (f"SELECT set_config(s.name, v.value, false) FROM (VALUES {values}) AS v(name, value)"  # noqa: S608
            " JOIN pg_settings s ON s.name = v.name WHERE s.source <> 'client'")
