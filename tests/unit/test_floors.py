"""The oldest supported versions: pyproject.toml's floors, constraints/floors.txt and the docs agree."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support.core import CORE, NEWEST_KAFKA, group_protocols, selection

REPO = Path(__file__).resolve().parents[2]


def project() -> dict[str, object]:
    return dict(tomllib.loads((REPO / "pyproject.toml").read_text())["project"])


def floor_of(requirement: Requirement) -> str:
    lower = [s.version for s in requirement.specifier if s.operator == ">="]
    others = [s for s in requirement.specifier if s.operator not in (">=", "<")]
    assert len(lower) == 1 and not others, f"{requirement}: one floor, at most a ceiling"
    return lower[0]


def newest() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints" / "newest.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def pinned() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints" / "floors.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_every_runtime_dependency_has_a_floor_and_the_constraints_pin_exactly_those_floors() -> None:
    requirements = [Requirement(r) for r in project()["dependencies"]]  # type: ignore[attr-defined]
    floors = {canonicalize_name(r.name): floor_of(r) for r in requirements}
    assert pinned() == floors


def test_the_newest_tested_versions_are_allowed_and_every_ceiling_was_tested() -> None:
    requirements = {canonicalize_name(Requirement(r).name): Requirement(r) for r in project()["dependencies"]}  # type: ignore[attr-defined]
    assert set(newest()) == set(requirements)
    for name, version in newest().items():
        assert requirements[name].specifier.contains(version), f"{name} {version} is outside {requirements[name]}"
    capped = {name for name, r in requirements.items() if any(s.operator == "<" for s in r.specifier)}
    assert capped == {"confluent-kafka", "dramatiq"}, "ceilings only where the matrix ran the newest release"


def test_the_test_extra_asks_for_no_newer_dramatiq_than_the_runtime_floor() -> None:
    extras = project()["optional-dependencies"]["test"]  # type: ignore[index]
    runtime = {canonicalize_name(Requirement(r).name): Requirement(r) for r in project()["dependencies"]}  # type: ignore[attr-defined]
    for line in extras:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name in runtime:
            assert floor_of(requirement) == floor_of(runtime[name]), line


def test_the_compatibility_page_names_every_floor() -> None:
    text = (REPO / "docs" / "compatibility.md").read_text()
    for name, version in pinned().items():
        assert re.search(rf"\b{re.escape(name)}\b.*\b{re.escape(version)}\b", text), f"{name} {version}"


def test_every_core_scenario_is_a_test_that_exists_and_only_the_kip848_one_needs_kafka_4() -> None:
    ids = [re.fullmatch(r"(tests/integration/[\w/]+\.py)::(\w+)(?:\[(\w+)\])?", test) for test in CORE]
    assert len(ids) >= 5 and all(ids)
    for found in ids:
        assert found is not None
        path, name, param = found.groups()
        source = (REPO / path).read_text()
        assert f"def {name}(" in source, f"{path}::{name}"
        if param:
            assert f'"{param}"' in source or param in group_protocols(NEWEST_KAFKA), f"{path}::{name}[{param}]"
    assert set(CORE) - set(selection("3.9.2")) == {t for t in CORE if t.endswith("[consumer]")}
    assert selection(NEWEST_KAFKA) == list(CORE)


def test_the_floors_run_takes_its_core_scenarios_from_the_one_list() -> None:
    assert "-m tests.support.core" in (REPO / "scripts" / "floors").read_text()


def test_ci_runs_the_floors_check() -> None:
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert "scripts/floors" in lines
