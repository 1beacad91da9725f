"""Prefect settings for running offline on a laptop or in CI: ephemeral API, no telemetry."""

from __future__ import annotations

import os
from pathlib import Path

OFFLINE_DEFAULTS = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3",
}


def configure_offline_prefect(state_dir: Path | None = None) -> None:
    """Set Prefect's offline defaults in the environment unless the user set them.

    Must run before ``prefect`` is imported. PREFECT_HOME goes to the state folder unless a
    Prefect API URL is configured (then the user's profile is theirs to keep).
    """
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if "PREFECT_API_URL" not in os.environ and "PREFECT_HOME" not in os.environ:
        from bq_refresh.settings import StateSettings

        base = state_dir or StateSettings().state_dir  # BQ_REFRESH_STATE_DIR, .env, or the XDG state folder
        home = (base / "prefect").resolve()
        home.mkdir(parents=True, exist_ok=True)
        os.environ["PREFECT_HOME"] = str(home)
