"""Every shipped manifest validates, and `batchgen validate` reports bad input with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from batchgen.cli import main
from batchgen.manifest.load import open_manifest, validate

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted([*ROOT.glob("examples/*.yaml"), ROOT / "examples" / "products_direct.csv",
                  *ROOT.glob("jobs/*.yaml")])


def test_the_shipped_manifests_exist() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in SHIPPED}
    assert {"examples/quickstart.yaml", "examples/catalogue.yaml", "examples/edit_products.yaml",
            "examples/products_direct.csv", "jobs/nightly-catalogue.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_shipped_manifest_validates(path: Path) -> None:
    summary = validate(path)
    assert summary.requests > 0 and summary.images >= summary.requests


def test_quickstart_is_small_and_uses_nano_banana_2() -> None:
    summary = validate(ROOT / "examples" / "quickstart.yaml")
    assert 6 <= summary.requests <= 12
    assert set(summary.by_model) == {"gemini-3.1-flash-image-preview"}


def test_edit_example_uses_local_photos() -> None:
    requests = list(open_manifest(ROOT / "examples" / "edit_products.yaml").requests())
    local = {p for r in requests for p in r.request.local_paths()}
    assert local and all(Path(p).is_file() and Path(p).stat().st_size < 30_000 for p in local)


def test_cli_validate_ok_text_and_json() -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["validate", str(ROOT / "examples" / "catalogue.yaml")])
    assert result.exit_code == 0, result.output
    assert "72 requests" in result.output and "gemini-3.1-flash-image-preview" in result.output
    result = runner.invoke(main, ["validate", "--json", str(ROOT / "examples" / "quickstart.yaml")])
    assert result.exit_code == 0
    assert json.loads(result.output)["requests"] == 12


def test_validate_says_when_the_manifests_credit_cap_stops_the_job_early(tmp_path: Path) -> None:
    items = "".join(f"  - {{id: i{i}, prompt: cat {i}}}\n" for i in range(10))
    path = tmp_path / "job.yaml"
    path.write_text(f"defaults: {{model: z-image-turbo}}\nrun: {{max_credits: 2}}\nitems:\n{items}")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "note: run.max_credits is 2: a run stops there, after about 40% of this estimate" in result.output
    data = json.loads(CliRunner().invoke(main, ["validate", "--json", str(path)]).stdout)
    assert data["max_credits"] == 2 and data["credits"] == 5
    path.write_text(f"defaults: {{model: z-image-turbo}}\nrun: {{max_credits: 50}}\nitems:\n{items}")
    assert "note:" not in CliRunner().invoke(main, ["validate", str(path)]).output


def test_cli_validate_bad_input_exits_2_with_file_row_and_field(tmp_path: Path) -> None:
    path = tmp_path / "products.csv"
    path.write_text("sku,prompt,model,size\nA,cat,gemini-3.1-flash-image-preview,1024x1024\nB,dog,nope,\n")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert f'{path} row 2: size: "1024x1024" is not accepted by gemini-3.1-flash-image-preview' in result.output
    assert f'{path} row 3: model: "nope" is not in the catalogue' in result.output


@pytest.mark.parametrize("command", [["validate", "--json"], ["run", "--emulator", "--json"]])
def test_json_mode_reports_a_bad_manifest_as_one_error_object_on_stdout(tmp_path: Path, command: list[str]) -> None:
    """A script reading --json must learn why nothing else came: the problems, as data, on stdout."""
    path = tmp_path / "products.csv"
    path.write_text("sku,prompt,model\nA,cat,nope\nB,,z-image-turbo\n")
    result = CliRunner().invoke(main, [command[0], str(path), *command[1:]])
    assert result.exit_code == 2 and "Traceback" not in result.output
    error = json.loads(result.stdout)
    assert error["event"] == "error" and error["exit_code"] == 2 and error["more_problems"] == 0
    assert "2 problems" in error["message"]
    assert [(p["file"], p["location"], p["field"]) for p in error["problems"]] == [
        (str(path), "row 2", "model"), (str(path), "row 3", "prompt")]
    assert not (tmp_path / "products.batchgen.db").exists()


def test_json_mode_reports_other_errors_too(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["status", str(tmp_path / "none.csv"), "--json"])
    assert result.exit_code == 2
    error = json.loads(result.stdout)
    assert error["event"] == "error" and error["exit_code"] == 2 and "no run state" in error["message"]
    assert "problems" not in error


def test_cli_validate_yaml_syntax_error_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("prompt: [oops\n")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    # The line where the unclosed list starts, not the end of the file where PyYAML gave up.
    assert (f"{path} line 1: YAML syntax error: the [ ] list that starts here is never closed (found the end of "
            "the file at line 2)") in result.output


def test_run_with_a_bad_manifest_exits_2_and_leaves_no_database(tmp_path: Path) -> None:
    """The rows are checked as they stream into the store; a database created for a manifest that turns out
    to be bad is removed again, and an existing one keeps what it had."""
    path = tmp_path / "job.yaml"
    path.write_text("name: job\nitems:\n  - id: a\n    prompt: ''\n  - id: b\n    prompt: ok\n    n: 99\n")
    result = CliRunner().invoke(main, ["run", str(path), "--emulator"])
    assert result.exit_code == 2, result.output
    assert "line 4: prompt" in result.output and "line 7: n: 99" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]
    # A job that ran before keeps its database, unchanged, when its manifest is later broken.
    path.write_text("name: job\nitems:\n  - id: a\n    prompt: a red chair\n")
    assert CliRunner().invoke(main, ["run", str(path), "--emulator"]).exit_code == 0
    db = tmp_path / "job.batchgen.db"
    before = CliRunner().invoke(main, ["status", "--db", str(db), "--json"]).output
    path.write_text("name: job\nitems:\n  - id: a\n    prompt: a red chair\n  - id: b\n    prompt: ''\n")
    assert CliRunner().invoke(main, ["run", str(path), "--emulator"]).exit_code == 2
    assert db.exists()
    after = CliRunner().invoke(main, ["status", "--db", str(db), "--json"]).output
    fields = ("total", "pending", "done", "failed", "images")
    assert [json.loads(after)[f] for f in fields] == [json.loads(before)[f] for f in fields] == [1, 0, 1, 0, 1]
