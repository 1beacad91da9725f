"""The PostgreSQL target block: a connection URI kept secret; builds psycopg and ADBC connections."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import adbc_driver_postgresql.dbapi as adbc
import psycopg
from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class PostgresTarget(Block):
    """The PostgreSQL database (Supabase or any server) the tables are published into."""

    _block_type_name = "bq-refresh PostgreSQL target"

    url: SecretStr | None = Field(
        default=None,
        description="PostgreSQL URI, e.g. postgresql://user:pass@db.xyz.supabase.co:5432/postgres.",
    )
    connection_info: Any | None = Field(
        default=None,
        description="prefect-sqlalchemy ConnectionComponents, used when url is empty.",
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
            rendered = self.connection_info.create_url().render_as_string(hide_password=False)
            return str(rendered).replace("postgresql+psycopg", "postgresql").replace("+psycopg2", "").replace("+asyncpg", "")
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
