"""Every bq-refresh process allocates Arrow batches from jemalloc (bq_refresh/__init__.py sets
ARROW_DEFAULT_MEMORY_POOL before pyarrow is imported, through whichever of flows/, tasks/ or blocks/ comes first),
unless the user set ARROW_DEFAULT_MEMORY_POOL; the figures that chose it are bench/run.py's (docs/benchmarks.md)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.once  # no database


def backend(entry: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    code = f"import {entry}\nimport pyarrow as pa\nprint(pa.default_memory_pool().backend_name)"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**clean, **env}, capture_output=True,
                          text=True, check=True).stdout.strip()


@pytest.mark.parametrize("entry", ["flows.cli", "flows.refresh_table", "tasks.sync", "blocks"])
def test_the_pool_is_jemalloc_whatever_is_imported_first(entry: str) -> None:
    assert backend(entry) == "jemalloc"


def test_arrow_default_memory_pool_set_by_the_user_wins() -> None:
    assert backend("flows.cli", ARROW_DEFAULT_MEMORY_POOL="system") == "system"
