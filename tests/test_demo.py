"""The demo, at a small size, end to end in its own state folder: its numbers match the source."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from bq_refresh.services import start_embedded_postgres, stop_embedded_postgres, stop_emulator
from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.emulator, pytest.mark.once, pytest.mark.second, pytest.mark.usefixtures("prefect_harness")]


def test_demo_two_nights_match_the_source(tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BQ_REFRESH_", "BIGQUERY_"))}
    env.update({"BQ_REFRESH_STATE_DIR": str(state), "PREFECT_API_URL": str(PREFECT_API_URL.value())})
    try:
        done = subprocess.run([sys.executable, "-m", "flows.cli", "demo", "--asins", "3", "--queries", "10",
                               "--weeks", "3", "--json", "--keep-up"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(done.stdout.strip().splitlines()[-1])
        night1, night2 = ({r["table"].split(".")[1]: r for r in n["tables"]} for n in report["nights"])
        apd1, apd2 = night1["asin_performance_data"], night2["asin_performance_data"]
        assert apd1["rows_inserted"] == report["source_rows"] == 90
        # the new column `brand` is filled for every row, not only the restated week's: of the 89 kept rows the
        # 69 with a brand are updated; the 20 whose brand is NULL are equal to what the table holds (not rewritten)
        assert (apd2["rows_inserted"], apd2["rows_updated"], apd2["rows_deleted"]) == (30, 69, 1)
        assert apd2["drift"]["columns_added"] == ["brand"] and apd2["drift"]["backfill"] == ["brand"]
        assert night2["daily_sqp_data"]["rows_deleted"] == 1
        views = [v["view"].split(".")[1] for v in report["nights"][1]["views"] if v["refreshed"]]
        assert views.index("weekly_summary") < views.index("monthly_summary") < views.index("yearly_summary")

        with psycopg.connect(start_embedded_postgres(state)) as conn:
            live = conn.execute("SELECT count(*), sum(purchases_asin_count), count(brand) FROM sqp.asin_performance_data").fetchone()
            weekly = conn.execute("SELECT sum(purchases) FROM sqp.weekly_summary").fetchone()
        import pyarrow as pa
        import pyarrow.compute as pc

        from flows.demo import sqp_weeks

        source = pa.concat_tables([sqp_weeks(3, 10, [0, 1]), sqp_weeks(3, 10, [2], seed=8).slice(1), sqp_weeks(3, 10, [3])])
        assert live is not None and live[0] == report["next_day"]["source_rows"] == source.num_rows
        assert live[1] == pc.sum(source.column("purchases_asin_count")).as_py() == (weekly[0] if weekly else None)
    finally:
        stop_emulator(state)
        stop_embedded_postgres(state)
