"""docs/testing.md's worked example runs as written: its files are taken from the page, run by
pytest with the plugin enabled the documented way, and fail the way the page shows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

DOC = Path(__file__).resolve().parents[2] / "docs" / "testing.md"


def example_files() -> dict[str, str]:
    """Code blocks of the page whose first line names a file (``# shop.py``)."""
    blocks = re.findall(r"```python\n# (\S+\.py)\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    return {name: body for name, body in blocks}


def test_the_page_names_the_module_its_tests_and_the_conftest_that_enables_the_plugin() -> None:
    files = example_files()
    assert set(files) == {"conftest.py", "shop.py", "test_shop.py", "test_shop_renamed.py"}
    assert files["conftest.py"].strip() == 'pytest_plugins = ["bridge.testing"]'


def test_the_worked_example_passes_and_its_broken_variant_fails_as_the_page_shows(pytester: pytest.Pytester) -> None:
    for name, body in example_files().items():
        pytester.path.joinpath(name).write_text(body)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    text = DOC.read_text()
    for line in (
        "E       KeyError: 'amount'",
        "E       bridge.testing.DeadLettered: 1 record(s) or message(s) failed for good; pass fail_fast=False to "
        "run() when a test expects that:",
        "E         invoices[0]@0 key='acme': book_invoice failed on attempt 4: KeyError: 'amount'",
        "test_shop_renamed.py:4: DeadLettered",
    ):
        assert line in text, "the page shows it"
        assert line in result.stdout.str()
