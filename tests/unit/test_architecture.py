"""The shape of the package: small modules, a small loop, no import cycles, and tests that hold
to the public seams of what they test."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "bridge"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Modules of the package that ``name`` imports anywhere in its body, function bodies too."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:
                target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                if target in known and target != name:
                    found.add(target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known and a.name != name}
    return found


def test_no_module_is_over_400_lines() -> None:
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > 400}
    assert long == {}


def test_the_loop_class_is_under_250_lines() -> None:
    tree = ast.parse((PACKAGE / "bridge.py").read_text())
    (loop,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Bridge"]
    assert loop.end_lineno is not None and loop.end_lineno - loop.lineno + 1 < 250


def test_no_module_of_the_package_imports_itself_back_even_inside_a_function() -> None:
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in trail:
                cycles.append([*trail[trail.index(nxt):], nxt])
            elif nxt not in seen:
                seen.add(nxt)
                visit(nxt, [*trail, nxt])

    seen: set[str] = set()
    for start in sorted(graph):
        if start not in seen:
            seen.add(start)
            visit(start, [start])
    assert cycles == []


def test_the_worker_side_does_not_depend_on_the_bridge_side() -> None:
    known = modules()
    loop_side = {"bridge.bridge", "bridge.assignments", "bridge.dispatch", "bridge.commit", "bridge.flow",
                 "bridge.completions", "bridge.reporting", "bridge.intake", "bridge.owned", "bridge.cli"}
    for name, path in known.items():
        if name.startswith("bridge.worker"):
            assert imports(name, path, known).isdisjoint(loop_side), name


# Attributes whose leading underscore is not ours to respect: dramatiq's, argparse's, and the
# fields of the tests' own stand-ins.
_NOT_OURS = {"_message", "_max_unpack_size", "_actions", "_option_string_actions", "_value", "_offset",
             "_headers", "_key", "_topic", "_partition", "_exception"}


def test_no_test_reaches_into_a_private_attribute_of_the_package() -> None:
    pattern = re.compile(r"(\w+)\._([a-z]\w*)")
    offenders = []
    for path in (ROOT / "tests").rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in pattern.finditer(line):
                owner, attribute = match.group(1), "_" + match.group(2)
                if attribute not in _NOT_OURS and owner not in ("self", "cls", "os", "sys", "threading"):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {owner}.{attribute}")
    assert offenders == []


def test_no_two_test_modules_share_a_file_name() -> None:
    # The test directories are not packages: pytest imports each test file under its bare name,
    # and a second file of the same name stops the whole session at collection.
    seen: dict[str, list[str]] = {}
    for path in (ROOT / "tests").rglob("test_*.py"):
        seen.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    assert {name: paths for name, paths in seen.items() if len(paths) > 1} == {}
