"""A job whose manifest is edited between runs (a new user's walkthrough): rows deleted, edited, added, and
a matrix value changed. Status, export, results.csv, index.jsonl and the report describe exactly the
requests the manifest produces now; a row that comes back is done again without anything being sent."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner

from batchgen.cli import main
from batchgen.results.provenance import INDEX_NAME
from tests.emulator_fixtures import EmulatorFactory
from tests.run_support import db_of, out_of, run

COLOURS = ["red", "blue", "green", "black", "white"]


def write(root: Path, rows: list[tuple[str, str]], sizes: list[str]) -> Path:
    with (root / "items.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["sku", "colour"])
        writer.writerows(rows)
    manifest = root / "job.yaml"
    manifest.write_text(yaml.safe_dump({
        "name": "job", "items_csv": "items.csv", "id_field": "sku", "defaults": {"model": "z-image-turbo"},
        "prompt": "A {style} photo of a {colour} mug", "matrix": {"style": ["studio", "lifestyle"], "size": sizes},
        "run": {"rate": "200/s", "concurrency": 50},
    }), encoding="utf-8")
    return manifest


def cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def status(manifest: Path) -> dict[str, Any]:
    return dict(json.loads(cli("status", "--db", str(db_of(manifest)), "--json")))


def validated(manifest: Path) -> int:
    return int(json.loads(cli("validate", str(manifest), "--json"))["requests"])


def export_rows(manifest: Path, *flags: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in cli("export", str(manifest), "--format", "jsonl", *flags).splitlines()]


async def test_deleted_edited_and_changed_rows_leave_every_result(tmp_path: Path,
                                                                    emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    rows = [(f"S{i}", c) for i, c in enumerate(COLOURS, 1)]
    manifest = write(tmp_path, rows, ["1:1", "4:5"])
    assert await run(manifest, emu.base_url) == 0
    # Delete S2, change S3's colour, add S6; then change the matrix "4:5" to "3:4".
    rows = [rows[0], ("S3", "purple"), *rows[3:], ("S6", "orange")]
    write(tmp_path, rows, ["1:1", "4:5"])
    assert await run(manifest, emu.base_url) == 0
    write(tmp_path, rows, ["1:1", "3:4"])
    assert await run(manifest, emu.base_url) == 0

    expected = validated(manifest)
    assert expected == 5 * 2 * 2
    s = status(manifest)
    assert (s["total"], s["done"], s["images"]) == (expected, expected, expected)
    # No longer produced: S2 (4), S3 in blue (4), the 4:5 requests of the five rows of the second run (10).
    assert s["removed"] == 4 + 4 + 10
    assert f"{expected}/{expected} done" in cli("status", "--db", str(db_of(manifest)))
    for per_image in (export_rows(manifest), export_rows(manifest, "--per-request")):
        assert len(per_image) == expected
        assert {r["sku"] for r in per_image} == {"S1", "S3", "S4", "S5", "S6"}
        assert {r["colour"] for r in per_image if r["sku"] == "S3"} == {"purple"}
        assert {r["size"] for r in per_image} == {"1:1", "3:4"}
    out = out_of(manifest)
    with (out / "results.csv").open(newline="", encoding="utf-8") as fh:
        results = list(csv.DictReader(fh))
    index = [json.loads(line) for line in (out / INDEX_NAME).read_text(encoding="utf-8").splitlines()]
    for listing in (results, index):
        assert len(listing) == expected
    assert {r["sku"] for r in results} == {"S1", "S3", "S4", "S5", "S6"}
    report = tmp_path / "report.html"
    assert f"({expected} tiles)" in cli("report", str(manifest), "-o", str(report))


async def test_a_row_that_comes_back_is_done_again_and_sends_nothing(tmp_path: Path,
                                                                      emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    rows = [(f"S{i}", c) for i, c in enumerate(COLOURS, 1)]
    manifest = write(tmp_path, rows, ["1:1"])
    assert await run(manifest, emu.base_url) == 0
    write(tmp_path, rows[1:], ["1:1"])
    assert await run(manifest, emu.base_url) == 0
    assert (status(manifest)["total"], status(manifest)["removed"]) == (8, 2)
    sent = emu.stats()["tasks_created"]
    write(tmp_path, rows, ["1:1"])
    assert await run(manifest, emu.base_url) == 0
    assert emu.stats()["tasks_created"] == sent  # S1 kept its images: not paid twice
    s = status(manifest)
    assert (s["total"], s["done"], s["images"], s["removed"]) == (10, 10, 10, 0)
    assert [r["sku"] for r in export_rows(manifest, "--per-request")][:2] == ["S1", "S1"]
