"""The run engine end to end against the in-process emulator over real HTTP: a job finishes with every
image on disk, a re-run is a no-op, new rows are picked up, and the budget, lock, retry, fallback,
policy-pause and expiry rules each do what docs/run-engine.md says. Tests marked `store_backend` run on
SQLite and on PostgreSQL."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from batchgen.cli import main
from batchgen.errors import ConfigError, StoreLockedError
from batchgen.results.status import collect
from batchgen.store.open import open_store
from batchgen.store.sqlite import Store
from tests.emulator_fixtures import EmulatorFactory
from tests.run_support import check_outputs, db_of, json_events, out_of, prompts, run, write_job


@pytest.mark.usefixtures("store_backend")
async def test_job_finishes_and_rerun_sends_nothing(tmp_path: Path, emulator_factory: EmulatorFactory,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    emu = await emulator_factory(partial_results_share=0.5)
    rows = prompts(30) + [{"id": f"multi{i}", "prompt": f"four tiles {i}", "n": 4} for i in range(10)]
    manifest = write_job(tmp_path, rows)
    assert await run(manifest, emu.base_url) == 0
    result = check_outputs(manifest)
    assert result["states"] == {"done": 40}
    assert 40 < result["images"] < 70  # n=4 requests may return fewer images: done, not failed
    created = emu.stats()["tasks_created"]
    assert created == 40
    out = capsys.readouterr().out
    assert '"event":"summary"' in out and '"event":"downloaded"' in out
    assert "sk-evo" not in out  # never the key
    # Re-running a finished job sends nothing.
    assert await run(manifest, emu.base_url) == 0
    assert emu.stats()["tasks_created"] == created
    # New rows in the CSV: only they are generated.
    write_job(tmp_path, rows + prompts(45)[40:])
    assert await run(manifest, emu.base_url) == 0
    assert emu.stats()["tasks_created"] == created + 5
    status = collect(db_of(manifest))
    assert {k: status[k] for k in ("total", "pending", "in_flight", "done", "failed")} == {
        "total": 45, "pending": 0, "in_flight": 0, "done": 45, "failed": 0}
    assert status["images"] == check_outputs(manifest)["images"]
    assert status["credits"]["used"] > 0 and status["credits"]["reserved"] == 0


async def test_a_fresh_database_generates_anew_instead_of_replaying_old_tasks(
        tmp_path: Path, emulator_factory: EmulatorFactory) -> None:
    # Idempotency keys are scoped to the database: a new database for the same job must not be handed the
    # first one's tasks (their result URLs may long have expired), while resends within one database are.
    emu = await emulator_factory()
    manifest = write_job(tmp_path, prompts(5))
    assert await run(manifest, emu.base_url) == 0
    assert await run(manifest, emu.base_url, db_path=tmp_path / "other.db", out_dir=tmp_path / "other") == 0
    stats = emu.stats()
    assert stats["tasks_created"] == 10
    assert stats["idempotent_replays"] == 0
    keys = [t["idempotency_key"] for t in emu.tasks()]
    assert len(set(keys)) == 10


@pytest.mark.usefixtures("store_backend")
async def test_out_overrides_the_manifest_folder_and_later_commands_find_it(
        tmp_path: Path, emulator_factory: EmulatorFactory) -> None:
    from batchgen.results.report import write_report

    emu = await emulator_factory()
    manifest = write_job(tmp_path, prompts(4))
    elsewhere = tmp_path / "elsewhere"
    assert await run(manifest, emu.base_url, out_dir=elsewhere) == 0
    assert len(list(elsewhere.glob("*.png"))) == 4
    assert collect(db_of(manifest))["output_dir"] == str(elsewhere.resolve())
    path, tiles = write_report(db_of(manifest), None)
    assert path.parent == elsewhere.resolve() and tiles == 4
    html = path.read_text()
    assert all(f'href="{p.name}"' in html for p in elsewhere.glob("*.png"))


async def test_old_server_without_batch_poll_idempotency_or_credits(tmp_path: Path,
                                                                  emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(batch_poll=False, idempotency=False, credits_endpoint=False)
    manifest = write_job(tmp_path, prompts(15))
    assert await run(manifest, emu.base_url) == 0
    assert check_outputs(manifest)["states"] == {"done": 15}


@pytest.mark.usefixtures("store_backend")
async def test_max_credits_stops_resumably_then_finishes(tmp_path: Path, emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    manifest = write_job(tmp_path, prompts(20), run={"concurrency": 4})  # z-image-turbo: 0.5 credits each
    assert await run(manifest, emu.base_url, max_credits=3.2) == 3
    with open_store(db_of(manifest)) as store:
        spent = store.credit_totals()
        assert spent.spent <= 3.2 and spent.reserved == 0
        assert 1 <= store.counts()["done"] <= 6
    assert emu.stats()["tasks_created"] <= 6
    assert await run(manifest, emu.base_url) == 0
    assert check_outputs(manifest)["states"] == {"done": 20}


async def test_max_runtime_is_kept_with_submits_still_waiting_at_the_limit(
        tmp_path: Path, emulator_factory: EmulatorFactory, capsys: pytest.CaptureFixture[str]) -> None:
    """The halt comes early enough that its grace for calls under way ends at the limit: with submits still
    queued at a 5/s limiter the run used to end a full grace (2 s) late."""
    emu = await emulator_factory(latency_s=150.0)  # 1.5 s at the tests' time scale
    manifest = write_job(tmp_path, prompts(24), run={"rate": "5/s", "concurrency": 24})
    assert await run(manifest, emu.base_url, max_runtime_s=2.0) == 3
    summary = json_events(capsys.readouterr().out)[-1]
    assert summary["reason"] == "runtime", summary
    assert summary["elapsed_s"] < 2.0 + 1.25, summary  # before: about 4 s (the limit plus the whole grace)
    made = len(emu.tasks())
    assert 0 < made < 24
    # The next run collects the rest; a submit cut off at the limit is sent again with its idempotency key.
    assert await run(manifest, emu.base_url) == 0
    assert check_outputs(manifest)["states"] == {"done": 24}
    assert len(emu.tasks()) == 24  # nothing paid twice


@pytest.mark.usefixtures("store_backend")
async def test_a_new_output_folder_for_a_job_with_images_is_refused_unless_they_were_moved_there(
        tmp_path: Path, emulator_factory: EmulatorFactory, capsys: pytest.CaptureFixture[str]) -> None:
    """--out elsewhere on a job with saved images would record a folder without them (status and the report
    then show every image missing); a folder the images were moved to is taken, with a note."""
    emu = await emulator_factory()
    manifest = write_job(tmp_path, prompts(3))
    assert await run(manifest, emu.base_url) == 0
    first = collect(db_of(manifest))["output_dir"]
    with pytest.raises(ConfigError, match=r"this job's images are in .*--out") as info:
        await run(manifest, emu.base_url, out_dir=str(tmp_path / "elsewhere"))
    assert info.value.exit_code == 2 and str(out_of(manifest)) in str(info.value)
    assert collect(db_of(manifest))["output_dir"] == first  # nothing changed
    moved = tmp_path / "moved"
    shutil.move(out_of(manifest), moved)
    capsys.readouterr()
    assert await run(manifest, emu.base_url, out_dir=str(moved)) == 0
    assert any("output moved" in line for line in capsys.readouterr().out.splitlines())
    assert collect(db_of(manifest))["output_dir"] == str(moved.resolve())
    assert check_outputs(manifest, out=moved)["states"] == {"done": 3}
    assert emu.stats()["tasks_created"] == 3  # nothing generated again


async def test_second_run_on_a_locked_database_names_the_holder(tmp_path: Path,
                                                                emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    manifest = write_job(tmp_path, prompts(3))
    with Store(db_of(manifest)) as holder:
        holder.runners.lock()
        with pytest.raises(StoreLockedError) as info:
            await run(manifest, emu.base_url)
        assert info.value.exit_code == 3 and "pid" in str(info.value)
    assert emu.stats()["tasks_created"] == 0
    assert await run(manifest, emu.base_url) == 0  # released: the next run works


@pytest.mark.usefixtures("store_backend")
async def test_failures_are_grouped_and_batchgen_retry_requeues_them(tmp_path: Path,
                                                                     emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(rules=[{"prompt": "^broken", "fail_with": "invalid_parameters", "times": 1}])
    rows = prompts(6) + [{"id": f"b{i}", "prompt": f"broken thing {i}"} for i in range(3)]
    manifest = write_job(tmp_path, rows)
    assert await run(manifest, emu.base_url) == 1
    status = collect(db_of(manifest))
    assert status["failed"] == 3 and status["done"] == 6
    assert status["failures"][0]["code"] == "invalid_parameters" and status["failures"][0]["count"] == 3
    result = CliRunner().invoke(main, ["retry", "--db", str(db_of(manifest)), "--code", "invalid_parameters"])
    assert result.exit_code == 0 and "requeued 3" in result.output
    assert await run(manifest, emu.base_url) == 0
    assert check_outputs(manifest)["states"] == {"done": 9}


@pytest.mark.usefixtures("store_backend")
async def test_model_unavailable_falls_back(tmp_path: Path, emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(rules=[{"model": "z-image-turbo", "fail_with": "model_unavailable"}])
    manifest = write_job(tmp_path, prompts(4), run={"fallback_models": ["nano-banana-2-lite"], "max_attempts": 1})
    assert await run(manifest, emu.base_url) == 0
    with open_store(db_of(manifest)) as store:
        for rec in store.iter_requests():
            assert [a.model for a in rec.attempt_rows] == ["z-image-turbo", "nano-banana-2-lite"]


async def test_a_run_of_policy_refusals_pauses_the_job(tmp_path: Path, emulator_factory: EmulatorFactory,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    emu = await emulator_factory(rules=[{"prompt": "forbidden", "fail_with": "content_policy_violation"}])
    manifest = write_job(tmp_path, prompts(40, "forbidden"), run={"policy_pause_after": 5, "concurrency": 2})
    assert await run(manifest, emu.base_url) == 3
    assert "content-policy refusals in a row" in capsys.readouterr().out
    assert emu.stats()["tasks_created"] < 10


@pytest.mark.parametrize("regenerate", [False, True])
@pytest.mark.usefixtures("store_backend")
async def test_expired_result_urls(tmp_path: Path, emulator_factory: EmulatorFactory, regenerate: bool) -> None:
    # Result URLs that expire at once: the re-fetch through the task cannot help either.
    emu = await emulator_factory(result_ttl_s=1e-6)
    manifest = write_job(tmp_path, prompts(2), run={"regenerate_expired": regenerate, "max_attempts": 2})
    assert await run(manifest, emu.base_url) == 1
    with open_store(db_of(manifest)) as store:
        for rec in store.iter_requests():
            assert rec.error_code == "result_expired"
            assert len(rec.attempt_rows) == (2 if regenerate else 1)


async def test_an_edited_row_takes_its_file_name_and_a_returning_row_takes_it_back(
        tmp_path: Path, emulator_factory: EmulatorFactory) -> None:
    """A changed prompt is a new request under the same file name. The name holds what the manifest asks
    for now: the replaced request's image moves aside to _superseded/ (kept, never deleted), and when the
    old row comes back its image gets the name back, with nothing submitted. (Found by a new-user
    walkthrough: a_1.png kept the old picture and the new one was saved as a_1-<key>.png.)"""
    import hashlib

    from tests.run_support import image_files, out_of

    def sha(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    emu = await emulator_factory()
    manifest = write_job(tmp_path, [{"id": "a", "prompt": "a red chair"}, {"id": "b", "prompt": "a stool"}])
    assert await run(manifest, emu.base_url) == 0
    out = out_of(manifest)
    red = sha(out / "a_1.png")
    write_job(tmp_path, [{"id": "a", "prompt": "a blue chair"}, {"id": "b", "prompt": "a stool"}])
    assert await run(manifest, emu.base_url) == 0
    blue = sha(out / "a_1.png")
    assert blue != red
    names = sorted(str(p.relative_to(out)) for p in image_files(out))
    assert names == ["_superseded/a_1." + red[:12] + ".png", "a_1.png", "b_1.png"], names
    assert check_outputs(manifest)["images"] == 3
    tasks = len(emu.tasks())
    write_job(tmp_path, [{"id": "a", "prompt": "a red chair"}, {"id": "b", "prompt": "a stool"}])
    assert await run(manifest, emu.base_url) == 0
    assert len(emu.tasks()) == tasks  # the red chair was paid for once: nothing is generated again
    assert sha(out / "a_1.png") == red
    names = sorted(str(p.relative_to(out)) for p in image_files(out))
    assert names == ["_superseded/a_1." + blue[:12] + ".png", "a_1.png", "b_1.png"], names
    assert check_outputs(manifest)["images"] == 3
