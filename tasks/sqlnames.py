"""Identifiers as data: every schema, table and column name reaches SQL through these helpers."""

from __future__ import annotations

from collections.abc import Iterable

from psycopg import sql


def ident(*parts: str) -> sql.Identifier:
    """Quote a possibly qualified name: ident("sqp", "t") -> "sqp"."t"."""
    return sql.Identifier(*parts)


def idents(names: Iterable[str]) -> sql.Composed:
    """Comma-separated quoted column names."""
    return sql.SQL(", ").join(sql.Identifier(n) for n in names)


def quote_ident(name: str) -> str:
    """Quote one identifier without a connection (PostgreSQL rules: double the double quotes)."""
    return '"' + name.replace('"', '""') + '"'


def split_qualified(name: str, default_schema: str) -> tuple[str, str]:
    """Split "schema.table" (or "table") into its parts; quoted dots are not supported."""
    if "." in name:
        schema, table = name.split(".", 1)
        return schema, table
    return default_schema, name
