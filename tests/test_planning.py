"""Wave planning: pure logic."""

from __future__ import annotations

import pytest

from bq_refresh.errors import DependencyCycle, is_transient
from tasks.planning import plan_waves

pytestmark = pytest.mark.once  # pure logic: no database


def test_waves_follow_dependencies_and_priority() -> None:
    tables = {"a": 100, "b": 90, "s1": 80, "s2": 85, "w": 10}
    deps = [("a", "s1", "hard"), ("b", "s2", "soft"), ("a", "s2", "hard"), ("s1", "w", "hard"), ("x", "a", "hard")]
    assert plan_waves(tables, deps) == [["a", "b"], ["s2", "s1"], ["w"]]


@pytest.mark.parametrize("deps, named", [
    ([("a", "b", "hard"), ("b", "a", "hard")], "a -> b -> a"),
    ([("a", "b", "hard"), ("b", "c", "soft"), ("c", "a", "hard")], "a -> b -> c -> a"),
])
def test_a_cycle_is_an_error_naming_it(deps: list[tuple[str, str, str]], named: str) -> None:
    with pytest.raises(DependencyCycle, match=named):
        plan_waves({"a": 1, "b": 1, "c": 1, "d": 1}, deps)


def test_transient_classification() -> None:
    import psycopg
    from google.api_core import exceptions as gexc

    from bq_refresh.errors import ConfigError, SchemaDriftError, SourceUnavailable

    assert is_transient(SourceUnavailable("x")) and is_transient(gexc.ServiceUnavailable("x"))
    assert is_transient(psycopg.OperationalError("lost")) and is_transient(ConnectionResetError())
    assert not is_transient(SchemaDriftError("x")) and not is_transient(ConfigError("x"))
    assert not is_transient(gexc.Forbidden("no")) and not is_transient(ValueError("x"))
