"""The code's floors, read from its imports (ast, no import run): bq_refresh/ is the ground floor and imports
nothing of the project above it; blocks/ imports only bq_refresh/; tasks/ never imports flows/ (the entry points
stay above); and one table's refresh runs its phases one way: refresh_plan <- batches, gate <- publish <- direct
<- stage, so no phase imports one after it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.once  # no database

PHASES = ["refresh_plan", "batches", "gate", "publish", "direct", "stage"]  # each may import only those before it


def imports(path: Path) -> set[str]:
    """Every module a file imports (at its top or inside a function), as dotted names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def project_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).glob("*.py"))


@pytest.mark.parametrize(("folder", "forbidden"), [
    ("bq_refresh", ("tasks", "flows", "blocks")),
    ("blocks", ("tasks", "flows")),
    ("tasks", ("flows",)),
])
def test_no_floor_imports_one_above_it(folder: str, forbidden: tuple[str, ...]) -> None:
    wrong = [f"{path.relative_to(ROOT)} imports {name}" for path in project_files(folder) for name in sorted(imports(path))
             if name.split(".")[0] in forbidden]
    assert wrong == []


def test_the_phases_of_a_refresh_import_one_way() -> None:
    wrong = []
    for i, phase in enumerate(PHASES):
        later = {f"tasks.{p}" for p in PHASES[i + 1:]}
        wrong += [f"tasks/{phase}.py imports {name}" for name in sorted(imports(ROOT / "tasks" / f"{phase}.py"))
                  if name in later]
    assert wrong == []


def test_one_module_owns_a_runs_checkpoint_and_one_writes_the_quarantine() -> None:
    """refresh_checkpoints is read and written by tasks/checkpoints.py alone (the other modules call it with their
    own connection); rows reach refresh_quarantine through tasks/quarantine.py alone (maintenance archives them)."""
    code = {p.relative_to(ROOT).as_posix(): p.read_text() for folder in ("tasks", "flows", "blocks", "bq_refresh")
            for p in project_files(folder)}
    assert [name for name, text in code.items() if "refresh_checkpoints" in text] == ["tasks/checkpoints.py"]
    assert [name for name, text in code.items() if "refresh_quarantine" in text and name.startswith("tasks/")] == [
        "tasks/maintenance.py", "tasks/quarantine.py"]  # maintenance moves old rows to the archive
    for name in ("checkpoints", "quarantine"):  # state below the phases: it imports none of them
        assert not {m for m in imports(ROOT / "tasks" / f"{name}.py")
                    if m.startswith("tasks.") and m.split(".")[1] in PHASES + ["load"]}
