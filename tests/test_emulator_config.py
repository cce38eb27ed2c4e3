"""The emulator's settings: scenario YAML, flags on top, errors that name the file and the field, and the
`batchgen emulator` command in its own process."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from batchgen.cli import main
from batchgen.emulator import EmulatorConfig
from batchgen.errors import ConfigError
from tests.emulator_fixtures import AUTH, EmulatorProcess

SCENARIO = """\
time_scale: 0.05
seed: 7
rate_limit: 50
partial_results_share: 0.2
batch_poll: false
faults:
  submit: {http_429: 0.05, drop_after: 0.01}
  poll: {http_500: 0.01}
  tasks:
    errors: {generation_timeout: 0.02, content_policy_violation: 0.01}
    stalled: 0.01
rules:
  - prompt: "(?i)flaky"
    fail_with: generation_timeout
    times: 2
  - model: gpt-4o-image
    fail_with: 503
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scenario.yaml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    config = EmulatorConfig.from_options()
    assert config.time_scale == 1.0 and config.seed is None and config.rate_limit is None
    assert config.idempotency and config.batch_poll and config.credits_endpoint
    assert config.files_quota == 100 and config.api_keys == []


def test_a_scenario_sets_everything(tmp_path: Path) -> None:
    config = EmulatorConfig.from_options(scenario_path=write(tmp_path, SCENARIO))
    assert config.time_scale == 0.05 and config.seed == 7 and config.rate_limit == 50
    assert config.batch_poll is False and config.partial_results_share == 0.2
    assert config.faults.submit.http_429 == 0.05 and config.faults.tasks.errors["generation_timeout"] == 0.02
    assert config.rules[0].times == 2 and config.rules[1].fail_with == 503


def test_flags_override_the_scenario(tmp_path: Path) -> None:
    config = EmulatorConfig.from_options(api_keys=["k1"], time_scale=0.5, seed=3, rate_limit=9,
                                         scenario_path=write(tmp_path, SCENARIO))
    assert (config.api_keys, config.time_scale, config.seed, config.rate_limit) == (["k1"], 0.5, 3, 9)


@pytest.mark.parametrize(("text", "field"), [
    ("faults:\n  submitt: {http_429: 0.1}\n", "line 2: faults.submitt: unknown key; allowed keys: submit, poll"),
    ("bogus: 1\n", "line 1: bogus: unknown key"),
    ("faults:\n  poll: {http_500: 1.5}\n", "faults.poll.http_500"),
    ("faults:\n  poll: {http_500: 0.6, drop: 0.6}\n", "faults.poll"),
    ("time_scale: 0\n", "time_scale"),
    ("faults:\n  tasks: {errors: {made_up_code: 0.1}}\n", "made_up_code"),
    ("rules:\n  - prompt: '(unclosed'\n    fail_with: upstream_error\n", "rules.0.prompt"),
    ("rules:\n  - fail_with: teapot\n", "rules.0.fail_with"),
    ("rules:\n  - fail_with: 418\n", "rules.0.fail_with"),
    ("- just\n- a list\n", "mapping"),
    ("faults: [unclosed\n", "YAML syntax error"),
])
def test_scenario_mistakes_name_the_file_and_field(tmp_path: Path, text: str, field: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        EmulatorConfig.from_options(scenario_path=path)
    assert str(path) in str(caught.value) and field in str(caught.value)


def test_every_problem_of_a_scenario_is_listed_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "faults:\n  submit:\n    http_429: 5\n  bogus: 1\naccounts:\n  - api_key: k\n    rate: 5\n")
    with pytest.raises(ConfigError) as caught:
        EmulatorConfig.from_options(scenario_path=path)
    lines = str(caught.value).splitlines()
    assert lines[0] == "the scenario has 3 problem(s):"
    assert [line.strip().removeprefix(str(path) + " ").split(":")[0] for line in lines[1:]] == [
        "line 3", "line 4", "line 7"]
    assert "http_429: 5 is too large; use at most 1" in lines[1]
    assert "accounts.0.rate: unknown key; allowed keys: api_key, rate_limit, credits" in lines[3]


def test_a_run_on_the_emulator_with_a_bad_scenario_changes_nothing(tmp_path: Path) -> None:
    scenario = write(tmp_path, "bogus: 1\n")
    manifest = tmp_path / "job.yaml"
    manifest.write_text("name: job\nprompt: a red chair\n")
    result = CliRunner().invoke(main, ["run", str(manifest), "--emulator", "--emulator-scenario", str(scenario)])
    assert result.exit_code == 2 and "bogus: unknown key" in result.output
    assert not (tmp_path / "job.batchgen.db").exists() and not (tmp_path / "out").exists()


def test_a_missing_scenario_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        EmulatorConfig.from_options(scenario_path=tmp_path / "nope.yaml")


def test_the_cli_reports_a_bad_scenario_with_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, "faults:\n  submitt: {}\n")
    result = CliRunner().invoke(main, ["emulator", "--port", "0", "--scenario", str(path)])
    assert result.exit_code == 2
    assert "faults.submitt: unknown key" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_the_emulator_in_its_own_process(emulator_process: Callable[..., EmulatorProcess], tmp_path: Path) -> None:
    scenario = write(tmp_path, "rate_limit: 50\nfaults:\n  poll: {http_500: 0.5}\n")
    emu = emulator_process(scenario=scenario, api_keys=["sk-evo-test-key"], time_scale=0.01)
    assert emu.base_url.startswith("http://127.0.0.1:") and not emu.base_url.endswith(":0")
    request = urllib.request.Request(
        emu.base_url + "/v1/images/generations", data=json.dumps({"prompt": "a cat"}).encode(),
        headers={**AUTH, "Content-Type": "application/json"}, method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        task = json.loads(response.read())
    assert task["id"].startswith("task-unified-")
    stats = emu.stats()
    assert stats["tasks_created"] == 1 and stats["time_scale"] == 0.01 and stats["rate_limit"] == 50
    assert [t["id"] for t in emu.tasks()] == [task["id"]]
