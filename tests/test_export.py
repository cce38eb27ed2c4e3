"""The export and the provenance index: rows joined to the item's own columns, one per image (or request),
failed requests included, formula cells neutralised in CSV but not in JSONL, atomic files (written through
a symlink, straight into a pipe or device, a clear error for a path that cannot be created), the files
every run leaves in its output folder, and a provenance record that is enough to regenerate its image."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from batchgen.cli import main
from batchgen.models import GenerationRequest, request_key
from batchgen.results import export as export_mod
from batchgen.results.export import (
    COLUMNS_PER_IMAGE,
    export_results,
    neutralise_cell,
    ordered,
    plan_columns,
)
from batchgen.results.provenance import INDEX_NAME, find
from batchgen.store.sqlite import Store
from tests.emulator_fixtures import API_KEY, EmulatorFactory
from tests.results_support import FAILED, IMAGES, ITEMS, REQUESTS, TILES, Job, build_job
from tests.run_support import run

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Job:
    return build_job(tmp_path_factory.mktemp("job"))


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- pure functions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["=1+1", '=HYPERLINK("http://x","y")', "+1", "-5", "@SUM(A1)", "\t=1", "\r=1",
                                   "\n=1"])
def test_formula_like_cells_get_a_leading_quote(value: str) -> None:
    assert neutralise_cell(value) == "'" + value


@pytest.mark.parametrize("value", ["mug", "", "a=b", "1+1", "SKU-1", " =1", 1.5, 0, None])
def test_other_cells_pass_unchanged(value: Any) -> None:
    assert neutralise_cell(value) == value


def test_user_columns_that_collide_get_a_prefix_and_ours_keep_their_names() -> None:
    cols = plan_columns(["sku", "status", "name"], ["style", "size", "name"])
    assert [c for c, _ in cols.item] == ["sku", "item.status", "name"]
    assert [c for c, _ in cols.variant] == ["style", "variant.size", "variant.name"]
    assert cols.names[-len(COLUMNS_PER_IMAGE):] == list(COLUMNS_PER_IMAGE)
    assert len(set(cols.names)) == len(cols.names)


def test_fields_follow_the_inputs_order_then_first_seen() -> None:
    assert ordered(["colour", "name", "sku", "extra"], ["sku", "name", "colour", "gone"]) == [
        "sku", "name", "colour", "extra"]
    assert ordered(["b", "a"], []) == ["b", "a"]


# --- against a finished job ----------------------------------------------------------------------------


def test_one_row_per_image_plus_one_per_request_without_images(job: Job, tmp_path: Path) -> None:
    assert job.exit_code == 1  # two requests failed for good
    out = tmp_path / "images.csv"
    assert export_results(job.db, output=out) == TILES
    rows = read_csv(out)
    assert len(rows) == TILES
    # The item's own columns first, in the CSV's order, then the matrix variable, then ours.
    assert list(rows[0])[:4] == ["sku", "name", "colour", "style"]
    assert list(rows[0])[4:] == list(COLUMNS_PER_IMAGE)
    done = [r for r in rows if r["status"] == "done"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(done) == IMAGES and len(failed) == FAILED
    for r in failed:
        assert r["path"] == "" and r["error_code"] == "invalid_parameters" and r["error_message"]
        assert r["sku"] == "SKU-5"
    for r in done:
        assert (job.out_dir / r["path"]).is_file() and not Path(r["path"]).is_absolute()
        assert r["task_id"].startswith("task-") and r["model"] == "z-image-turbo"
    assert sorted(r["path"] for r in done if r["sku"] == "SKU-6") == [
        "SKU-6/bold_1.png", "SKU-6/bold_2.png", "SKU-6/plain_1.png", "SKU-6/plain_2.png"]
    with Store(job.db) as store:
        assert sum(float(r["credits"]) for r in rows) == pytest.approx(store.credit_totals().used)


def test_csv_neutralises_formulas_and_jsonl_keeps_the_data(job: Job, tmp_path: Path) -> None:
    export_results(job.db, output=tmp_path / "x.csv")
    export_results(job.db, fmt="jsonl", output=tmp_path / "x.jsonl")
    by_sku_csv = {r["sku"]: r for r in read_csv(tmp_path / "x.csv")}
    by_sku_json = {r["sku"]: r for r in read_jsonl(tmp_path / "x.jsonl")}
    for item in ITEMS:
        row_csv, row_json = by_sku_csv[item["sku"]], by_sku_json[item["sku"]]
        assert row_json["name"] == item["name"] and row_json["colour"] == item["colour"]
        assert row_csv["name"] == neutralise_cell(item["name"])
        assert row_csv["colour"] == neutralise_cell(item["colour"])
    assert by_sku_csv["SKU-3"]["name"].startswith("'=HYPERLINK(")
    assert by_sku_csv["SKU-3"]["prompt"].startswith("'=HYPERLINK(")
    assert by_sku_csv["SKU-2"]["colour"] == "'@SUM(1+1)"
    assert by_sku_json["SKU-3"]["prompt"].startswith("=HYPERLINK(")
    assert "\u2028" in by_sku_json["SKU-4"]["name"]  # JSONL is the data, unicode separators and all
    # No cell of the CSV starts like a formula.
    with (tmp_path / "x.csv").open(newline="", encoding="utf-8") as fh:
        for row in csv.reader(fh):
            assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in row)


def test_per_request_rows(job: Job, tmp_path: Path) -> None:
    out = tmp_path / "requests.jsonl"
    assert export_results(job.db, fmt="jsonl", output=out, per_request=True) == REQUESTS
    rows = read_jsonl(out)
    assert sum(r["images"] for r in rows) == IMAGES
    sku6 = [r for r in rows if r["sku"] == "SKU-6"]
    assert [len(r["paths"]) for r in sku6] == [2, 2] and all(r["n"] == 2 for r in sku6)
    assert all(r["paths"] == [] and r["status"] == "failed" for r in rows if r["sku"] == "SKU-5")
    export_results(job.db, output=tmp_path / "requests.csv", per_request=True)
    csv_rows = read_csv(tmp_path / "requests.csv")
    assert next(r["paths"] for r in csv_rows if r["sku"] == "SKU-6").split("|") == sku6[0]["paths"]


def test_stdout_when_no_output(job: Job, capsys: pytest.CaptureFixture[str]) -> None:
    assert export_results(job.db, fmt="jsonl") == TILES
    assert len(capsys.readouterr().out.splitlines()) == TILES


def test_a_failed_export_leaves_the_previous_file(job: Job, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "images.csv"
    out.write_text("previous\n")

    def broken(*args: Any, **kwargs: Any) -> Any:
        yield {c: "" for c in export_mod.discover_columns(Store(job.db)).names}
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(export_mod, "iter_rows", broken)
    with pytest.raises(RuntimeError):
        export_results(job.db, output=out)
    assert out.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images.csv"]  # no temporary file left behind


def test_every_run_leaves_results_and_provenance_in_the_output_folder(job: Job) -> None:
    results = read_csv(job.out_dir / "results.csv")
    assert len(results) == TILES
    index = read_jsonl(job.out_dir / INDEX_NAME)
    on_disk = sorted(p.relative_to(job.out_dir).as_posix() for p in job.out_dir.rglob("*.png"))
    assert sorted(r["path"] for r in index) == on_disk and len(on_disk) == IMAGES
    for name in ("results.csv", INDEX_NAME):
        assert API_KEY not in (job.out_dir / name).read_text(encoding="utf-8")


def test_provenance_is_enough_to_trace_and_regenerate_an_image(job: Job) -> None:
    image = job.out_dir / "SKU-6" / "bold_2.png"
    sha = hashlib.sha256(image.read_bytes()).hexdigest()
    record = find(job.out_dir, sha)  # found by content, e.g. after the file was renamed
    assert record is not None and record == find(job.out_dir, "SKU-6/bold_2.png")
    assert record["item_id"] == "SKU-6" and record["variant"] == {"style": "bold"} and record["index"] == 2
    assert record["metadata"] == {"sku": "SKU-6", "name": "blue mug", "colour": "blue"}
    assert record["task_id"].startswith("task-") and record["credits"] == 1.0 and record["model"] == "z-image-turbo"
    for when in ("submitted_at", "completed_at", "downloaded_at"):
        assert record[when].endswith("Z")
    assert record["submitted_at"] <= record["completed_at"] <= record["downloaded_at"]
    # The recorded parameters rebuild the very request: same key, same body to send again.
    request = GenerationRequest(**record["request"])
    assert request.prompt == "blue mug in bold style" and request.n == 2
    assert request_key(record["item_id"], record["variant"], request) == record["request_key"]


async def test_a_failing_export_only_warns_and_keeps_the_exit_code(
        tmp_path: Path, emulator_factory: EmulatorFactory, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from tests.results_support import write_manifest

    emu = await emulator_factory()

    def broken(db_path: Path, out_dir: Path, job_name: str | None = None) -> dict[str, int]:
        raise OSError("read-only file system")

    monkeypatch.setattr(export_mod, "write_run_files", broken)
    manifest = write_manifest(tmp_path)
    assert await run(manifest, emu.base_url) == 0  # nothing is refused by this emulator
    out = capsys.readouterr().out
    assert "could not write the export" in out and "read-only file system" in out


async def test_readme_example_job_export_and_report_match_the_requests(
        tmp_path: Path, emulator_factory: EmulatorFactory) -> None:
    """The acceptance: the README's quickstart job, then `batchgen export` and `batchgen report`."""
    shutil.copy(EXAMPLES / "quickstart.yaml", tmp_path / "quickstart.yaml")
    emu = await emulator_factory()
    assert await run(tmp_path / "quickstart.yaml", emu.base_url, rate="200/s") == 0
    with Store(tmp_path / "quickstart.batchgen.db") as store:
        requests = store.counts()["done"]
        images, _ = store.image_totals()
    assert requests == images == 12
    cli = CliRunner()
    manifest = str(tmp_path / "quickstart.yaml")
    result = cli.invoke(main, ["export", manifest, "-o", str(tmp_path / "quickstart.csv")])
    assert result.exit_code == 0, result.output
    rows = read_csv(tmp_path / "quickstart.csv")
    assert len(rows) == images and len({r["request_key"] for r in rows}) == requests
    assert [r["subject"] for r in rows][:1] == ["a red fox curled up asleep in fresh snow"]
    result = cli.invoke(main, ["export", manifest, "--format", "jsonl", "--per-request"])
    assert result.exit_code == 0 and len(result.output.splitlines()) == requests
    result = cli.invoke(main, ["report", manifest, "-o", str(tmp_path / "quickstart-report.html")])
    assert result.exit_code == 0 and "(12 tiles)" in result.output, result.output
    html_text = (tmp_path / "quickstart-report.html").read_text(encoding="utf-8")
    assert html_text.count('<figure class="tile image"') == images
    assert len(list((tmp_path / "thumbs").glob("*.jpg"))) == images
    # Without -o, the report goes to the job's output folder.
    result = cli.invoke(main, ["report", manifest])
    assert result.exit_code == 0 and (tmp_path / "out" / "quickstart" / "report.html").is_file()


def test_export_of_an_unknown_format_is_refused(job: Job) -> None:
    from batchgen.errors import ConfigError

    with pytest.raises(ConfigError):
        export_results(job.db, fmt="xlsx", output=None)


def test_csv_header_is_neutralised_too(tmp_path: Path) -> None:
    cols = plan_columns(["=cmd"], [])
    buf = io.StringIO()
    export_mod.write_rows(buf, "csv", cols, [])
    assert buf.getvalue().startswith("'=cmd,")


def test_run_files_are_rewritten_only_when_something_changed(job: Job, tmp_path: Path) -> None:
    from batchgen.results.export import RESULTS_NAME, write_run_files

    db = tmp_path / "copy.db"
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{job.db}{suffix}").exists():
            shutil.copy(f"{job.db}{suffix}", f"{db}{suffix}")
    out = tmp_path / "out"
    assert write_run_files(db, out) == {INDEX_NAME: IMAGES, RESULTS_NAME: TILES}
    assert write_run_files(db, out) == {}  # nothing changed: a large job's nightly no-op costs nothing
    with Store(db) as store:
        assert store.requeue_failed(None) == FAILED  # a change the export shows
    assert write_run_files(db, out) == {INDEX_NAME: IMAGES, RESULTS_NAME: TILES}
    (out / INDEX_NAME).unlink()
    assert write_run_files(db, out)[INDEX_NAME] == IMAGES  # a file that went missing is written again


def test_field_names_come_in_first_seen_order(job: Job) -> None:
    with Store(job.db) as store:
        items, variants = store.field_names()
    # Each request's metadata is stored with sorted keys; fields first seen in later requests would follow.
    assert items == ["colour", "name", "sku"]
    assert variants == ["style"]


# --- where -o points: a link, a pipe, a device, a path that cannot be created ---------------------------------


def test_a_symlinked_target_is_written_through_and_the_link_stays(job: Job, tmp_path: Path) -> None:
    real = tmp_path / "real.csv"
    real.write_text("previous\n")
    link = tmp_path / "link.csv"
    link.symlink_to("real.csv")  # relative, as `ln -s real.csv link.csv` makes it
    assert export_results(job.db, output=link) == TILES
    assert link.is_symlink() and os.readlink(link) == "real.csv"
    assert len(read_csv(real)) == TILES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.csv", "real.csv"]  # no temporary file left


def test_a_fifo_target_is_written_into_for_its_reader(job: Job, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    got: list[str] = []
    # A daemon: renamed over, the FIFO would never get a writer and its reader would wait forever.
    reader = threading.Thread(target=lambda: got.append(fifo.read_text(encoding="utf-8")), daemon=True)
    reader.start()
    assert export_results(job.db, output=fifo) == TILES
    reader.join(timeout=10)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert got and len(list(csv.DictReader(io.StringIO(got[0], newline="")))) == TILES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe.csv"]


def test_dev_null_is_written_into_and_stays_a_device(job: Job) -> None:
    assert export_results(job.db, output=Path(os.devnull)) == TILES
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="/dev/full is Linux's")
def test_a_full_device_is_a_clear_fault_and_stays_a_device(job: Job) -> None:
    result = CliRunner().invoke(main, ["export", "--db", str(job.db), "-o", "/dev/full"])
    assert result.exit_code == 3, result.output
    assert result.output == "error: cannot write the export /dev/full: no space left on the device\n"
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


@pytest.mark.parametrize("command", ["export", "report"])  # the report is written by the same function
def test_an_output_under_a_file_is_bad_input_and_leaves_nothing(
        job: Job, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    monkeypatch.chdir(tmp_path)
    Path("ok.csv").write_text("x\n")
    result = CliRunner().invoke(main, [command, "--db", str(job.db), "-o", "ok.csv/x.out"])
    assert result.exit_code == 2, result.output
    assert result.output == f"error: cannot write the {command} ok.csv/x.out: ok.csv is a file, not a folder\n"
    assert [p.name for p in tmp_path.rglob("*")] == ["ok.csv"]  # no .part file, no thumbs/


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
@pytest.mark.parametrize("command", ["export", "report"])
def test_an_output_in_a_folder_that_takes_no_files_is_bad_input(job: Job, command: str) -> None:
    result = CliRunner().invoke(main, [command, "--db", str(job.db), "-o", "/proc/x.out"])
    assert result.exit_code == 2, result.output
    assert result.output == f"error: cannot write the {command} /proc/x.out: /proc does not accept new files\n"


def test_dash_is_stdout_and_dev_stdout_appended_to_a_log_keeps_what_it_held(job: Job, tmp_path: Path) -> None:
    """`-o -` is stdout (no file named "-"); `-o /dev/stdout >> log` appends, as the shell was asked: the
    file the descriptor names is written into as it is, not replaced (which dropped the earlier lines)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo)}
    cmd = [sys.executable, "-m", "batchgen", "export", "--db", str(job.db)]
    dashed = subprocess.run([*cmd, "-o", "-"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert dashed.returncode == 0, dashed.stderr
    assert len(list(csv.DictReader(io.StringIO(dashed.stdout, newline="")))) == TILES
    assert not (tmp_path / "-").exists()
    log = tmp_path / "app.log"
    log.write_text("earlier line\n")
    for _ in range(2):
        with log.open("a") as fh:
            done = subprocess.run([*cmd, "-o", "/dev/stdout"], stdout=fh, stderr=subprocess.PIPE, env=env,
                                  text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    first, rest = log.read_text().split("\n", 1)
    records = list(csv.reader(io.StringIO(rest, newline="")))  # cells may hold line breaks
    assert first == "earlier line" and len(records) == 2 * (TILES + 1) and records[0] == records[TILES + 1]
