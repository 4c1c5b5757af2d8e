"""The configuration reference is generated from the settings model and kept in sync."""

from __future__ import annotations

from pathlib import Path

from bridge.settings import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_every_setting_is_documented_with_its_environment_variable() -> None:
    text = DOC.read_text()
    missing = [name for name in Settings.model_fields if f"`BRIDGE_{name.upper()}`" not in text]
    assert missing == []


def test_the_reference_documents_no_setting_that_does_not_exist() -> None:
    import re

    documented = set(re.findall(r"\| `BRIDGE_([A-Z_]+)`", DOC.read_text()))
    assert documented == {name.upper() for name in Settings.model_fields}


def test_the_generated_tables_match_the_settings_model() -> None:
    from devstack.reference import render

    text = DOC.read_text()
    assert render(text) == text, "run: python -m devstack config-reference --write"


def test_every_setting_has_a_description() -> None:
    assert [name for name, field in Settings.model_fields.items() if not field.description] == []
