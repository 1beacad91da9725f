"""Automations as code: notify through a notification block when a bq-refresh flow run fails or crashes and
bq-refresh could not report it itself.

Who reports what, so that one failure makes one notification per channel: bq-refresh's own code (the
refresh-table hooks, the parent flow) sends every failure it sees to REFRESH_WEBHOOK_URL and
REFRESH_NOTIFICATION_BLOCK, and marks the flow run it reported with the event ``bq-refresh.alert.delivered``.
The automation notifies for a Failed or Crashed run of these flows that no such event followed within
``grace``: a process killed outright whose hooks never ran, a flow that could not be loaded, a hook that
failed, an alert delivered nowhere, a failed maintenance run.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, cast
from uuid import UUID

from prefect.automations import Automation, EventTrigger, Posture, SendNotification

AUTOMATION_NAME = "bq-refresh: flow run failed or crashed"
FLOW_NAMES = ["daily-refresh", "refresh-table", "maintenance"]
ALERTED_EVENT = "bq-refresh.alert.delivered"
# Long enough for a failed run's hooks to report it (they run right after the state is set).
GRACE = timedelta(minutes=2)
BODY = (
    "bq-refresh flow run {{ flow_run.name }} of {{ flow.name }} is {{ flow_run.state.name }}, and bq-refresh"
    " could not report it itself: {{ flow_run.state.message }}\nParameters: {{ flow_run.parameters }}\n"
    "{{ flow_run|ui_url }}"
)
log = logging.getLogger(__name__)


def failure_automation(block_document_id: UUID, grace: timedelta = GRACE) -> Automation:
    """The automation, built (not saved): a Failed or Crashed run of a bq-refresh flow that no
    ``ALERTED_EVENT`` for the same run follows within ``grace`` (Prefect holds one that comes first)."""
    return Automation(
        name=AUTOMATION_NAME,
        description="Notifies when a bq-refresh flow run ends Failed or Crashed and bq-refresh did not report it"
                    f" ({ALERTED_EVENT} within {grace.total_seconds():g} s).",
        trigger=EventTrigger(
            after={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
            expect={ALERTED_EVENT},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAMES},  # type: ignore[arg-type]
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=grace,
        ),
        actions=[SendNotification(block_document_id=block_document_id,
                                  subject="bq-refresh: {{ flow.name }} {{ flow_run.state.name }}", body=BODY)],
    )


def mark_alerted(flow_run_id: UUID | str, flow_id: UUID | str, flow_name: str) -> None:
    """Tell the failure automation that bq-refresh reported this flow run's failure (an alert was delivered).
    Never raises: without it the automation notifies too, which is the safe side."""
    try:
        from prefect.events import emit_event

        emit_event(
            event=ALERTED_EVENT,
            resource={"prefect.resource.id": f"prefect.flow-run.{flow_run_id}"},
            related=[{"prefect.resource.id": f"prefect.flow.{flow_id}", "prefect.resource.role": "flow",
                      "prefect.resource.name": flow_name}],
        )
    except Exception as exc:  # noqa: BLE001 - the event only spares a second notification
        log.warning("could not mark flow run %s as reported: %s", flow_run_id, exc)


def apply_failure_automation(block_name: str, grace: timedelta = GRACE) -> UUID:
    """Create or replace the automation, notifying through the saved notification block ``block_name``.

    Args:
        block_name: "block-type-slug/name" or a name of a saved notification block
            (e.g. "custom-webhook/bq-refresh-alerts" or "slack-webhook/ops").
        grace: how long after a run failed bq-refresh has to report it before the automation does.
    """
    from prefect.blocks.abstract import NotificationBlock
    from prefect.blocks.core import Block

    block = cast(Block, Block.load(block_name) if "/" in block_name else NotificationBlock.load(block_name))
    assert block._block_document_id is not None
    for existing in _existing():
        existing.delete()
    created = failure_automation(block._block_document_id, grace).create()
    return cast(UUID, cast(Any, created).id)


def _existing() -> list[Automation]:
    try:
        found = Automation.read(name=AUTOMATION_NAME)
    except ValueError:
        return []
    return [cast(Automation, found)] if found else []
