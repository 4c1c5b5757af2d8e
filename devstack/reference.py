"""The settings tables of docs/configuration.md, generated from the settings model.

``python -m devstack config-reference --write`` rewrites the generated blocks; a unit test fails
when the document and the model disagree.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo

from bridge.cli import _parser
from bridge.settings import Settings, WorkerSettings

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"

#: Tables of the document: marker name -> the ``group`` extra of the fields it lists.
TABLES = {"settings": None, "testing": "testing"}

_BEGIN = "<!-- generated:{name} (python -m devstack config-reference --write) -->"
_END = "<!-- end generated:{name} -->"


def _flags() -> dict[str, str]:
    """BRIDGE_ variable -> the command-line flag that overrides it, from the CLI's help texts."""
    flags: dict[str, str] = {}
    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    for sub in commands.choices.values():
        for action in sub._actions:
            found = re.search(r"\(BRIDGE_([A-Z_]+)", action.help or "")
            if not found or not action.option_strings:
                continue
            flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") else action.option_strings[0]
            if action.metavar:
                flag += f" {action.metavar}"
            text = f"`{flag}`" + (" (repeatable)" if isinstance(action, argparse._AppendAction) else "")
            flags.setdefault(found.group(1), text)
    return flags


def _default(field: FieldInfo) -> str:
    value: Any = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{'true' if value else 'false'}`"
    if isinstance(value, dict):
        return "`{}`" if not value else f"`{value}`"
    return f"`{value}`"


def table(group: str | None) -> str:
    flags = _flags()
    rows = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("group") != group:
            continue
        if not field.description:
            raise ValueError(f"setting {name!r} has no description")
        variable = f"BRIDGE_{name.upper()}"
        meaning = field.description
        if name in WorkerSettings.model_fields:
            meaning = f"*worker* — {meaning}"
        flag = flags.get(variable[len("BRIDGE_") :])
        rows.append(f"| `{variable}` |{f' {flag}' if flag else ''} | {_default(field)} | {meaning} |")
    return "\n".join(rows)


def render(text: str) -> str:
    """``text`` with every generated block replaced by the current tables."""
    for name, group in TABLES.items():
        begin, end = _BEGIN.format(name=name), _END.format(name=name)
        pattern = re.compile(re.escape(begin) + r"\n.*?\n" + re.escape(end), re.DOTALL)
        if not pattern.search(text):
            raise ValueError(f"{DOC.name} has no generated block {name!r} ({begin} ... {end})")
        # A plain replacement string would have its backslashes interpreted.
        block = f"{begin}\n{table(group)}\n{end}"
        text = pattern.sub(lambda _: block, text)  # noqa: B023 (used at once, inside the loop)
    return text


def main(write: bool) -> int:
    current = DOC.read_text()
    wanted = render(current)
    if write:
        if wanted != current:
            DOC.write_text(wanted)
            print(f"updated {DOC}")
        else:
            print(f"{DOC} is up to date")
        return 0
    print(wanted, end="")
    return 0
