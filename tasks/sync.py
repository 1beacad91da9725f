"""One table's refresh, by its phases (each its own module; this one names the entry points the flows use):

- tasks/refresh_plan.py: plan (columns and drift, the read and its session, the checkpoint); the plan and result types.
- tasks/stage.py: stage the rows (read, shape, hash, COPY into staging with the checkpoint); tasks/direct.py: the
  direct first load of an empty target; tasks/batches.py: what both load paths do to each batch.
- tasks/gate.py: the quality gate and the reconciliation.
- tasks/publish.py: publish (merge, delete guard, watermark, checkpoint closed), publish groups, staging discarded.
"""

from __future__ import annotations

from tasks.gate import check_staged
from tasks.publish import publish, publish_group
from tasks.refresh_plan import (
    FUNCTION_NAME,
    PublishResult,
    RefreshPlan,
    StageManifest,
    _columns,
    discard_staging,
    plan_refresh,
    result_gone,
    staging_name,
)
from tasks.stage import stage_rows

__all__ = ["FUNCTION_NAME", "PublishResult", "RefreshPlan", "StageManifest", "_columns", "check_staged",
           "discard_staging", "plan_refresh", "publish", "publish_group", "result_gone", "stage_rows", "staging_name"]
