"""The one place where the environment is chosen: embedded/emulated locally, real in production."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from blocks.bigquery import BigQuerySource
from blocks.postgres import PostgresTarget
from bq_refresh.redact import register_secret, url_password
from bq_refresh.settings import Settings


@dataclass(frozen=True)
class Resources:
    """The source and target a run works with."""

    source: BigQuerySource
    target: PostgresTarget
    settings: Settings


def resolve_resources(
    settings: Settings,
    *,
    source_block: str | None = None,
    target_block: str | None = None,
) -> Resources:
    """Pick the source and target: saved blocks by name if given, else the environment.

    An unset BQ_REFRESH_DATABASE_URL starts (or reuses) the embedded PostgreSQL in the state folder.
    """
    if source_block:
        source = cast(BigQuerySource, BigQuerySource.load(source_block))
    else:
        source = BigQuerySource.from_settings(settings)
    if target_block:
        target = cast(PostgresTarget, PostgresTarget.load(target_block))
        register_secret(target.uri())
        register_secret(url_password(target.uri()))
    elif settings.database_url is not None:
        target = PostgresTarget(url=settings.database_url)
    else:
        from bq_refresh.services import start_embedded_postgres

        target = PostgresTarget(url=start_embedded_postgres(settings.state_dir))  # type: ignore[arg-type]
    target = target.model_copy(update={"session_timeouts": settings.session_timeouts})
    return Resources(source=source, target=target, settings=settings)
