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

    def uri(self) -> str:
        """Return the connection URI (a secret: never log it)."""
        if self.url is not None:
            return self.url.get_secret_value()
        if self.connection_info is not None:
            rendered = self.connection_info.create_url().render_as_string(hide_password=False)
            return str(rendered).replace("postgresql+psycopg", "postgresql").replace("+psycopg2", "").replace("+asyncpg", "")
        raise ValueError("PostgresTarget needs url or connection_info")

    def connect(self, *, autocommit: bool = False) -> psycopg.Connection[Any]:
        """Open a psycopg connection (transactions explicit unless autocommit)."""
        return psycopg.connect(self.uri(), autocommit=autocommit, application_name=self.application_name)

    def connect_adbc(self) -> adbc.Connection:
        """Open an ADBC connection for bulk COPY (autocommit off), named like the others in pg_stat_activity."""
        uri = self.uri()
        if uri.startswith(("postgresql://", "postgres://")) and "application_name=" not in uri:
            uri += ("&" if "?" in uri else "?") + "application_name=" + quote(self.application_name)
        return adbc.connect(uri)
