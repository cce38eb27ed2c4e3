"""Acceptance (issue 16, automatic checks): the emulator returns blank, wrong-aspect and tiny images for
some prompts (rules) or a share of tasks (scenario); those images are set aside under _rejected/ and the
requests regenerated until their images pass; max_attempts and the credit cap are respected; `on_fail:
keep` flags without regenerating; CSV jobs are checked too; status and the export show it all."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import yaml

from batchgen.emulator import EmulatorConfig
from batchgen.errors import ConfigError
from batchgen.results.export import export_results
from batchgen.results.status import collect
from batchgen.store.sqlite import Store
from tests.emulator_fixtures import EmulatorFactory
from tests.run_support import check_outputs, db_of, out_of, prompts, run, write_job

RULES = [
    {"prompt": "^blank-once ", "fail_with": "blank", "times": 1},
    {"prompt": "^aspect-twice ", "fail_with": "wrong_aspect", "times": 2},
    {"prompt": "^tiny-once ", "fail_with": "tiny", "times": 1},
    {"prompt": "^always-blank ", "fail_with": "blank"},
]


def with_quality(manifest: Path, quality: dict[str, Any]) -> Path:
    data = yaml.safe_load(manifest.read_text())
    data["quality"] = quality
    manifest.write_text(yaml.safe_dump(data))
    return manifest


def bad_rows() -> list[dict[str, Any]]:
    return [
        {"id": "b1", "prompt": "blank-once a mug", "size": "1:1"},
        {"id": "a1", "prompt": "aspect-twice a lamp", "size": "16:9"},
        {"id": "t1", "prompt": "tiny-once a chair", "size": "4:5"},
        {"id": "x1", "prompt": "always-blank a table", "size": "1:1"},
    ]


async def test_bad_images_are_set_aside_and_regenerated_within_max_attempts(
        tmp_path: Path, emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(rules=RULES)
    manifest = write_job(tmp_path, prompts(20) + bad_rows(), run={"max_attempts": 3})
    code = await run(manifest, emu.base_url)
    assert code == 1  # x1 never passes
    check_outputs(manifest)  # results on disk == images recorded; _rejected/ is not among them
    out = out_of(manifest)
    with Store(db_of(manifest)) as store:
        by_id = {r.item_id: r for r in store.iter_requests()}
        aside = store.reviews.set_aside_images()
    expected_attempts = {"b1": 2, "a1": 3, "t1": 2, "x1": 3}
    for item, attempts in expected_attempts.items():
        assert len(by_id[item].attempt_rows) == attempts, item
    for item in ("b1", "a1", "t1"):
        rec = by_id[item]
        assert rec.state == "done" and [i.check_status for i in rec.images] == ["passed"]
        assert [a.state for a in rec.attempt_rows][-1] == "completed"
        assert all(a.state == "abandoned" and a.error_code == "quality_check_failed" for a in rec.attempt_rows[:-1])
    x1 = by_id["x1"]
    assert x1.state == "failed" and x1.error_code == "quality_check_failed" and x1.images == []
    assert "blank" in (x1.error_message or "") and "gave up after 3 attempt(s)" in (x1.error_message or "")
    # Every ordinary request passed first time.
    assert all(len(r.attempt_rows) == 1 and r.images[0].check_status == "passed"
               for r in by_id.values() if r.item_id.startswith("r"))
    # Every rejected image is kept, on disk, under _rejected/, with the check that failed.
    assert sorted((a.request_key, a.why) for a in aside) == sorted(
        [(by_id[i].key, "quality") for i, n in expected_attempts.items() for _ in range(n - (i != "x1"))])
    reasons = {by_id_key: set() for by_id_key in expected_attempts}
    for a in aside:
        assert a.path.startswith("_rejected/") and (out / a.path).is_file()
        item = next(i for i, r in by_id.items() if r.key == a.request_key)
        reasons[item].add((a.reason or "").split(":")[0])
    assert reasons == {"b1": {"blank"}, "a1": {"aspect"}, "t1": {"size"}, "x1": {"blank"}}
    status = collect(db_of(manifest))
    assert status["review"]["set_aside"] == 7 and status["failures"][0]["code"] == "quality_check_failed"
    # A failed check costs an attempt and its credits (the image was delivered and charged).
    assert status["credits"]["used"] == 0.5 * (20 + 2 + 3 + 2 + 3)


async def test_regeneration_stops_at_the_credit_cap(tmp_path: Path, emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(rules=RULES)
    rows = [{"id": "x1", "prompt": "always-blank a table", "size": "1:1"}, *prompts(2)]
    manifest = write_job(tmp_path, rows, run={"max_attempts": 10, "concurrency": 1})
    # 0.5 credits an image: four submissions fit under 2.1 (r0, r1 and two of x1), a fifth would pass it.
    code = await run(manifest, emu.base_url, max_credits=2.1)
    assert code == 3
    with Store(db_of(manifest)) as store:
        totals = store.credit_totals()
        by_id = {r.item_id: r for r in store.iter_requests()}
    assert totals.spent == 2.0
    assert by_id["r0000"].state == by_id["r0001"].state == "done"
    x1 = by_id["x1"]
    assert len(x1.attempt_rows) == 2 and x1.attempts == 2  # regenerated once, then the cap stopped it
    assert x1.state == "pending" and x1.error_code == "quality_check_failed"  # resumable with a bigger cap


async def test_on_fail_keep_flags_without_regenerating(tmp_path: Path, emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(rules=RULES)
    manifest = with_quality(write_job(tmp_path, prompts(3) + bad_rows()), {"on_fail": "keep"})
    assert await run(manifest, emu.base_url) == 0
    check_outputs(manifest)
    with Store(db_of(manifest)) as store:
        by_id = {r.item_id: r for r in store.iter_requests()}
        assert store.reviews.set_aside_images() == []
    for item, check in (("b1", "blank"), ("a1", "aspect"), ("t1", "size"), ("x1", "blank")):
        rec = by_id[item]
        assert rec.state == "done" and len(rec.attempt_rows) == 1
        assert rec.images[0].check_status == "failed" and (rec.images[0].check_reasons or "").startswith(check)
    assert not (out_of(manifest) / "_rejected").exists()
    assert collect(db_of(manifest))["review"]["check_failed"] == 4
    export_results(db_of(manifest), output=tmp_path / "rows.csv")
    with (tmp_path / "rows.csv").open(newline="") as fh:
        rows = {r["item_id"]: r for r in csv.DictReader(fh)}
    assert rows["a1"]["check_status"] == "failed" and rows["a1"]["check_reasons"].startswith("aspect")
    assert rows["r0000"]["check_status"] == "passed" and rows["r0000"]["review"] == "unreviewed"


async def test_checks_can_be_turned_off(tmp_path: Path, emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(rules=RULES)
    manifest = with_quality(write_job(tmp_path, bad_rows()), {"enabled": False})
    assert await run(manifest, emu.base_url) == 0
    with Store(db_of(manifest)) as store:
        assert {i.check_status for r in store.iter_requests() for i in r.images} == {None}


async def test_a_csv_job_is_checked_too_and_scenario_shares_make_bad_images(
        tmp_path: Path, emulator_factory: EmulatorFactory) -> None:
    # Every task of this emulator returns a blank image at first; a CSV job (no quality section) still
    # checks them, sets them aside and, out of attempts (the default 3), fails them.
    emu = await emulator_factory(faults={"tasks": {"bad_images": {"blank": 1.0}}})
    manifest = tmp_path / "rows.csv"
    manifest.write_text("id,prompt,model\na,a red mug,z-image-turbo\nb,a blue mug,z-image-turbo\n")
    assert await run(manifest, emu.base_url) == 1
    with Store(manifest.parent / "rows.batchgen.db") as store:
        reqs = list(store.iter_requests())
        aside = store.reviews.set_aside_images()
    assert [(r.state, r.error_code, len(r.attempt_rows)) for r in reqs] == [("failed", "quality_check_failed", 3)] * 2
    assert len(aside) == 6 and {a.reason.split(":")[0] for a in aside if a.reason} == {"blank"}


def test_scenario_bad_image_kinds_are_validated(tmp_path: Path) -> None:
    scenario = tmp_path / "s.yaml"
    scenario.write_text("faults:\n  tasks:\n    bad_images: {smudged: 0.1}\n")
    with pytest.raises(ConfigError, match=r"smudged.*blank, wrong_aspect, tiny"):
        EmulatorConfig.from_options(scenario_path=scenario)
    scenario.write_text("rules:\n  - {prompt: x, fail_with: tiny, times: 1}\n")
    assert EmulatorConfig.from_options(scenario_path=scenario).rules[0].fail_with == "tiny"
