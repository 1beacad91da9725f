"""The one place where the environment is chosen: embedded/emulated locally, real in production."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import cast

from prefect.blocks.core import Block

from blocks.bigquery import BigQuerySource
from blocks.postgres import PostgresTarget
from bq_refresh.errors import ConfigError
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
    """Pick the source and target: saved blocks by name (the arguments, else BQ_REFRESH_SOURCE_BLOCK and
    BQ_REFRESH_TARGET_BLOCK), else the environment.

    An unset BQ_REFRESH_DATABASE_URL and no target block starts (or reuses) the embedded PostgreSQL in the state
    folder; a block name given but not saved is an error, never the embedded default.

    Raises:
        ConfigError: a block name that the Prefect server does not hold (names the setting and the name).
    """
    source_block = source_block or settings.source_block
    target_block = target_block or settings.target_block
    if source_block:
        source = cast(BigQuerySource, _load(BigQuerySource, source_block, "BQ_REFRESH_SOURCE_BLOCK"))
        _register_credentials(source)
    else:
        source = BigQuerySource.from_settings(settings)
    if target_block:
        target = cast(PostgresTarget, _load(PostgresTarget, target_block, "BQ_REFRESH_TARGET_BLOCK"))
        register_secret(target.uri())
        register_secret(url_password(target.uri()))
    elif settings.database_url is not None:
        target = PostgresTarget(url=settings.database_url)
    else:
        from bq_refresh.services import start_embedded_postgres

        target = PostgresTarget(url=start_embedded_postgres(settings.state_dir))  # type: ignore[arg-type]
    if not target.session_timeouts:  # a saved block's own timeouts win over the settings'
        target = target.model_copy(update={"session_timeouts": settings.session_timeouts})
    return Resources(source=source, target=target, settings=settings)


def _load(block: type[Block], name: str, setting: str) -> Block:
    """A saved block by its document name, or a ConfigError that says which setting named it."""
    try:
        return cast(Block, block.load(name))
    except ValueError as exc:  # Prefect: "Unable to find block document named ... for block type ..."
        from prefect.settings import PREFECT_API_URL

        where = PREFECT_API_URL.value() or "the temporary local Prefect server (PREFECT_API_URL is not set)"
        raise ConfigError(f"{setting}={name}: no saved '{block.get_block_type_name()}' block of that name on {where}"
                          f" ({_first_line(exc)}); save it there or unset {setting}") from None


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _register_credentials(source: BigQuerySource) -> None:
    """A saved source block's key JSON, and the secrets inside it, masked wherever text leaves the process."""
    if source.credentials_json is None:
        return
    text = source.credentials_json.get_secret_value()
    register_secret(text)
    try:
        info = json.loads(text)
    except ValueError:
        return
    for k in ("private_key", "private_key_id", "client_secret", "refresh_token"):
        if isinstance(info.get(k), str):
            register_secret(info[k])
