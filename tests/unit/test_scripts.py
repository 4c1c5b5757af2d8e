"""The README's two commands, the scripts behind them and .ci/run agree with each other."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    """The shell commands of the README's "two commands" section, in order."""
    text = (REPO / "README.md").read_text()
    section = text.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def commands_of(path: Path) -> list[str]:
    """The non-comment, non-empty lines of a shell script, stripped."""
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def package_list(name: str) -> list[str]:
    result = subprocess.run(
        ["bash", "-c", f'source scripts/lib.sh && printf "%s\\n" "${{{name}[@]}}"'],
        cwd=REPO, capture_output=True, text=True, check=True,
    )
    return result.stdout.split()


def test_the_readme_gives_exactly_two_commands_a_demo_and_a_test_script() -> None:
    assert readme_commands() == ["scripts/demo", "scripts/test"]


def test_ci_runs_the_readme_test_command_and_runs_no_pytest_of_its_own_in_the_main_virtualenv() -> None:
    test_command = readme_commands()[1]
    ci = commands_of(REPO / ".ci" / "run")
    assert test_command in ci
    # The main suite runs only through the README's command, so the two cannot drift.
    main_pytest = re.compile(r"(^|\s)(\$PY|\$VENV/bin/python|\.venv/bin/python)\s+-m\s+pytest\b")
    assert [line for line in ci if main_pytest.search(line)] == []


def test_the_test_script_runs_pytest_in_the_virtualenv_with_the_arguments_it_was_given() -> None:
    assert commands_of(REPO / "scripts" / "test")[-1] == 'exec "$VENV/bin/python" -m pytest "$@"'


def test_both_commands_are_executable_scripts_that_install_through_the_shared_library() -> None:
    for command, packages in zip(readme_commands(), ("DEMO_PACKAGES", "TEST_PACKAGES"), strict=True):
        script = REPO / shlex.split(command)[0]
        assert script.stat().st_mode & 0o111, f"{script} is not executable"
        lines = commands_of(script)
        assert "source scripts/lib.sh" in lines
        assert f'ensure_packages "${{{packages}[@]}}"' in lines
        assert "ensure_python" in lines
    assert 'ensure_packages "${TEST_PACKAGES[@]}"' in commands_of(REPO / ".ci" / "run")


def test_only_the_shared_library_calls_apt_get() -> None:
    callers = [
        path.relative_to(REPO).as_posix()
        for path in [*(REPO / "scripts").iterdir(), REPO / ".ci" / "run"]
        if any("apt-get" in line for line in commands_of(path) if not line.startswith("echo"))
    ]
    assert callers == ["scripts/lib.sh"]


def test_the_demo_packages_bring_java_maven_redis_and_venv_and_the_tests_add_rabbitmq_and_git() -> None:
    demo, tests = package_list("DEMO_PACKAGES"), package_list("TEST_PACKAGES")
    assert set(demo) == {"default-jre-headless", "maven", "redis-server", "python3-venv"}
    assert set(tests) - set(demo) == {"rabbitmq-server", "git"}
