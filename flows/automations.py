"""Automations as code: notify through a webhook block when a bq-refresh flow run fails or crashes.

A process killed by OOM or SIGKILL cannot run its own hooks; the Prefect server still sees the run
go Crashed (or the worker marks it), and this automation turns that into a notification.
"""

from __future__ import annotations

from typing import Any, cast
from uuid import UUID

from prefect.automations import Automation, EventTrigger, Posture, SendNotification

AUTOMATION_NAME = "bq-refresh: flow run failed or crashed"
FLOW_NAMES = ["daily-refresh", "refresh-table", "maintenance"]
BODY = (
    "bq-refresh flow run {{ flow_run.name }} of {{ flow.name }} is {{ flow_run.state.name }}: "
    "{{ flow_run.state.message }}\nParameters: {{ flow_run.parameters }}\n{{ flow_run|ui_url }}"
)


def failure_automation(block_document_id: UUID) -> Automation:
    """The automation, built (not saved)."""
    return Automation(
        name=AUTOMATION_NAME,
        description="Sends a notification when any bq-refresh flow run ends Failed or Crashed.",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAMES},  # type: ignore[arg-type]
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[SendNotification(block_document_id=block_document_id,
                                  subject="bq-refresh: {{ flow.name }} {{ flow_run.state.name }}", body=BODY)],
    )


def apply_failure_automation(block_name: str) -> UUID:
    """Create or replace the automation, notifying through the saved notification block ``block_name``.

    Args:
        block_name: "block-type-slug/name" or a name of a saved notification block
            (e.g. "custom-webhook/bq-refresh-alerts" or "slack-webhook/ops").
    """
    from prefect.blocks.abstract import NotificationBlock
    from prefect.blocks.core import Block

    block = cast(Block, Block.load(block_name) if "/" in block_name else NotificationBlock.load(block_name))
    assert block._block_document_id is not None
    for existing in _existing():
        existing.delete()
    created = failure_automation(block._block_document_id).create()
    return cast(UUID, cast(Any, created).id)


def _existing() -> list[Automation]:
    try:
        found = Automation.read(name=AUTOMATION_NAME)
    except ValueError:
        return []
    return [cast(Automation, found)] if found else []
