"""The README stays true: its manifest example validates, every command and flag it lists exists, and CI
runs exactly the README's test command."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from batchgen.cli import main
from batchgen.manifest.load import validate

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_manifest_example_validates(tmp_path: Path) -> None:
    block = re.search(r"```yaml\n(.*?)```", README, re.S)
    assert block is not None
    shutil.copy(ROOT / "examples" / "products.csv", tmp_path / "products.csv")
    (tmp_path / "job.yaml").write_text(block.group(1))
    summary = validate(tmp_path / "job.yaml")
    assert summary.requests == 12 * 2 * 3


COMMAND_ROWS = re.findall(r"^\| `batchgen (\w+)([^`]*)` \|", README, re.M)


def test_the_command_table_is_found() -> None:
    assert {name for name, _ in COMMAND_ROWS} == {"run", "status", "retry", "validate", "models", "export",
                                                  "report", "review", "emulator"}


@pytest.mark.parametrize(("command", "usage"), COMMAND_ROWS)
def test_every_flag_the_readme_lists_exists(command: str, usage: str) -> None:
    help_text = CliRunner().invoke(main, [command, "--help"]).output
    for flag in re.findall(r"(--[a-z-]+|-o\b)", usage):
        assert flag in help_text, f"batchgen {command} has no {flag}"


@pytest.mark.parametrize(("command", "usage"), COMMAND_ROWS)
def test_the_readme_lists_every_flag_of_each_command(command: str, usage: str) -> None:
    listed = set(re.findall(r"(--[a-z-]+|-o\b)", usage))
    for param in main.commands[command].params:
        if isinstance(param, click.Option) and not any(opt in listed for opt in param.opts):
            pytest.fail(f"the README's row of batchgen {command} does not list {param.opts[0]}")


def test_ci_runs_the_readmes_set_up_and_test_command() -> None:
    commands = re.findall(r"^(python3 -m venv .*)$", README, re.M)
    assert len(commands) >= 2
    first, second = commands[0], commands[1]
    assert "--emulator" in first and "pytest" in second
    ci = (ROOT / ".ci" / "run").read_text()
    assert second in ci.splitlines()  # word for word


def test_every_stop_reason_is_in_the_exit_codes_table() -> None:
    """Scripts branch on the summary's `reason`: each value the engine can give is explained in the docs."""
    from batchgen.engine.runstate import StopReason

    engine_doc = (ROOT / "docs" / "run-engine.md").read_text()
    documented = set(re.findall(r"^\| `(\w+)` \| ", engine_doc.split("## Exit codes", 1)[1], re.M))
    assert {r.value for r in StopReason} <= documented
