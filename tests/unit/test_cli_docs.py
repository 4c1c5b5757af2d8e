"""Every command line the documentation shows is one the CLI accepts.

Read from README.md and docs/*.md: each ``kafka-dramatiq-bridge COMMAND ...`` in a code block or
an inline code span, and the command-line flag tables of the configuration reference. A flag a
command rejects, a command that does not exist, or a table that says a command takes a flag it
does not (or the reverse) fails here.
"""

from __future__ import annotations

import argparse
import functools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from bridge.cli import _parser

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CONFIGURATION = REPO / "docs" / "configuration.md"
PROGRAM = "kafka-dramatiq-bridge"
#: Tokens that mark a synopsis rather than a command to run as written.
PLACEHOLDER = re.compile(r"[\[\]<>|…]|\.\.\.")


@functools.cache
def commands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for flag in parser._option_string_actions if flag not in ("-h", "--help")}


@dataclass(frozen=True)
class Invocation:
    where: str
    command: str
    args: list[str]


def code_fragments(text: str) -> list[tuple[int, str]]:
    """(line number, code) for each line of a fenced block (continuations joined) and each
    inline code span outside the blocks."""
    fragments: list[tuple[int, str]] = []
    fence: str | None = None
    pending = ""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith(("```", "~~~")):
            fence = None if fence else stripped[:3]
            continue
        if fence:
            if stripped.endswith("\\"):
                pending += stripped[:-1] + " "
                continue
            fragments.append((number, pending + line))
            pending = ""
        else:
            fragments += [(number, span) for span in re.findall(r"`([^`]+)`", line)]
    return fragments


def invocations(text: str, name: str) -> list[Invocation]:
    found = []
    for number, code in code_fragments(text):
        for match in re.finditer(rf"(?<![\w/-]){re.escape(PROGRAM)}\s+(\S+)([^#\n]*)", code):
            try:
                args = shlex.split(match.group(2))
            except ValueError:
                args = match.group(2).split()
            found.append(Invocation(f"{name}:{number}", match.group(1), args))
    return found


def problems_of(invocation: Invocation) -> list[str]:
    parsers = commands()
    parser = parsers.get(invocation.command)
    if parser is None:
        return [f"{invocation.where}: `{PROGRAM} {invocation.command}`: no such command ({', '.join(parsers)})"]
    found = []
    for token in invocation.args:
        if token.startswith("-") and len(token) > 1 and not re.fullmatch(r"-\d+", token):
            flag = token.split("=", 1)[0] if token.startswith("--") else token[:2]
            if flag not in options(parser):
                found.append(f"{invocation.where}: `{PROGRAM} {invocation.command}` does not take {flag}")
    # A bare command name in prose names the command; a command line with arguments must parse.
    as_written = invocation.args and not any(PLACEHOLDER.search(token) for token in invocation.args)
    if not found and as_written:
        try:
            parser.parse_args(invocation.args)
        except SystemExit:
            found.append(f"{invocation.where}: `{PROGRAM} {invocation.command} {shlex.join(invocation.args)}` "
                         "is refused by its parser")
    return found


def check_text(text: str, name: str = "doc") -> list[str]:
    return [problem for invocation in invocations(text, name) for problem in problems_of(invocation)]


def flag_table_rows(text: str) -> list[tuple[str, list[str], dict[str, bool]]]:
    """Rows of the tables whose header has one column per command: (where, flags, command -> yes)."""
    rows = []
    lines = text.splitlines()
    for index, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        named = [c.strip("`") for c in cells[1:]]
        if not line.startswith("|") or not set(commands()) & set(named):
            continue
        columns = {i: cmd for i, cmd in enumerate(named, 1) if cmd in commands()}
        for number in range(index + 2, len(lines)):
            row = lines[number]
            if not row.startswith("|"):
                break
            values = [c.strip() for c in row.strip().strip("|").split("|")]
            flags = [span.split()[0] for span in re.findall(r"`([^`]+)`", values[0]) if span.startswith("-")]
            marks = {cmd: values[i].lower() == "yes" for i, cmd in columns.items()}
            rows.append((f"{CONFIGURATION.name}:{number + 1}", flags, marks))
    return rows


def generated_table_flags(text: str) -> list[str]:
    block = text.split("<!-- generated:settings", 1)[1].split("<!-- end generated:settings", 1)[0]
    return [span.split()[0] for row in block.splitlines()[3:] if row.startswith("|")
            for span in re.findall(r"`([^`]+)`", row.split("|")[2]) if span.startswith("-")]


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_every_command_line_a_document_shows_is_accepted_by_that_commands_parser(doc: Path) -> None:
    assert check_text(doc.read_text(), doc.name) == []


def test_the_documents_show_each_command_at_least_once() -> None:
    shown = {i.command for doc in DOCS for i in invocations(doc.read_text(), doc.name)}
    assert set(commands()) <= shown


def test_the_check_fails_on_a_flag_the_command_rejects() -> None:
    doc = "```sh\nkafka-dramatiq-bridge status tasks --group-protocol consumer   # rejected\n```\n"
    assert check_text(doc) == ["doc:2: `kafka-dramatiq-bridge status` does not take --group-protocol"]
    assert check_text("Run `kafka-dramatiq-bridge replay orders.dlq --redis-url redis://r/0`.") != []
    assert check_text("`kafka-dramatiq-bridge rewind orders:3`") != []  # no such command
    assert check_text("`kafka-dramatiq-bridge pause orders:3 --json`") != []
    assert check_text("`kafka-dramatiq-bridge reset-offsets orders --to-offset 5 --to-latest`") != []  # one position
    assert check_text("`kafka-dramatiq-bridge skip orders:3`") != []  # no offset
    assert check_text("`kafka-dramatiq-bridge reset-offsets orders:3 --to-datetime 2026-03-01T09:00:00Z`") == []
    assert check_text("`kafka-dramatiq-bridge status` needs READ on the group") == []
    assert check_text("```\nkafka-dramatiq-bridge run tasks \\\n    --log-level debug\n```") != []  # not a choice
    assert check_text("```\nkafka-dramatiq-bridge run tasks \\\n    --group-id orders -X a=b -P src\n```") == []


def test_the_flag_table_says_exactly_which_command_takes_which_flag() -> None:
    rows = flag_table_rows(CONFIGURATION.read_text())
    assert rows, f"no command-line flag table in {CONFIGURATION.name}"
    wrong = []
    for where, flags, marks in rows:
        assert flags, f"{where}: no flag in the first column"
        for flag in flags:
            for command, takes in marks.items():
                if (flag in options(commands()[command])) != takes:
                    wrong.append(f"{where}: {flag} {'is' if takes else 'is not'} listed for {command}")
    assert wrong == []


def test_every_flag_of_every_command_is_in_the_flag_table() -> None:
    listed = {flag for _, flags, _ in flag_table_rows(CONFIGURATION.read_text()) for flag in flags}
    missing = {f"{name} {flag}" for name, parser in commands().items() for flag in options(parser) - listed}
    assert missing == set()


def test_every_flag_of_the_settings_table_is_taken_by_some_command() -> None:
    flags = generated_table_flags(CONFIGURATION.read_text())
    assert "--bootstrap-servers" in flags
    everywhere = set().union(*(options(parser) for parser in commands().values()))
    assert [flag for flag in flags if flag not in everywhere] == []
