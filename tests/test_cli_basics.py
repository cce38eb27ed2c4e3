"""The CLI's surface: help texts with examples, version, and the catalogue listing."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from batchgen import __version__, catalog
from batchgen.cli import main

COMMANDS = ["run", "status", "retry", "validate", "models", "export", "report", "emulator"]


def test_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output
    assert f"batchgen {command}" in result.output


def test_models_json_lists_all_twenty() -> None:
    result = CliRunner().invoke(main, ["models", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.output)
    assert {r["name"] for r in rows} == set(catalog.MODELS)
    assert len(rows) == 20


def test_run_without_key_is_a_clear_error(tmp_path) -> None:
    manifest = tmp_path / "job.csv"
    manifest.write_text("prompt\na cat\n")
    result = CliRunner().invoke(main, ["run", str(manifest)])
    assert result.exit_code == 2
    assert "EVOLINK_API_KEY" in result.output
    assert "Traceback" not in result.output
