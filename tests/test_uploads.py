"""Reference images from local files (issue 6), end to end against the in-process emulator over real HTTP:
each photo is uploaded once per content (emulator stats by sha256) in a run and across resumed runs, a stale
or nearly stale upload is uploaded again before use, a full quota is handled by deleting only batchgen's own
unneeded uploads, remote references pass through, and Files API refusals name the request they block."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils
from click.testing import CliRunner
from PIL import Image

from batchgen.api.client import EvolinkClient
from batchgen.cli import main
from batchgen.engine.uploads import Uploader
from batchgen.models import State
from batchgen.store.sqlite import RequestRecord, Store
from batchgen.store.sqlite_migrations import migration_set
from tests.emulator_fixtures import API_KEY, FAST_TIME_SCALE, EmulatorFactory
from tests.run_support import check_outputs, db_of, run, write_job

REMOTE = "https://cdn.example.com/reference/fabric.png"  # the emulator trusts other hosts' URLs unchecked
REPO = Path(__file__).resolve().parent.parent


def photo(path: Path, colour: str, fmt: str | None = None) -> Path:
    Image.new("RGB", (48, 32), colour).save(path, format=fmt)
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def uploads_of(manifest: Path) -> list[Any]:
    with Store(db_of(manifest)) as store:
        return store.uploads.live()


def bodies(manifest: Path) -> dict[str, dict[str, Any]]:
    """item id → body of its last attempt."""
    with Store(db_of(manifest)) as store:
        return {r.item_id: r.attempt_rows[-1].body or {} for r in store.iter_requests() if r.attempt_rows}


def request_stub(key: str = "v1-stub", item_id: str = "stub") -> RequestRecord:
    return RequestRecord(key=key, seq=1, item_id=item_id, variant={}, metadata={}, params={}, model="z-image-turbo",
                         n=1, est_credits=0.5, source="job.csv row 2", state=State.PENDING, attempts=0, attempt_no=0,
                         not_before=0.0, error_code=None, error_message=None, created_at=None, updated_at=None)


async def test_shared_photos_uploaded_once_mixed_refs_and_resume_uploads_nothing(
        tmp_path: Path, emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    a = photo(tmp_path / "a.png", "red")
    b = photo(tmp_path / "b.jpg", "blue")
    c = photo(tmp_path / "c.webp", "green", "WEBP")
    rows = [{"id": f"a{i:03d}", "prompt": f"product on marble {i}", "image_urls": "a.png"} for i in range(150)]
    rows += [{"id": f"m{i:02d}", "prompt": f"mixed references {i}", "image_urls": f"b.jpg|{REMOTE}|c.webp"}
             for i in range(10)]
    manifest = write_job(tmp_path, rows)
    assert await run(manifest, emu.base_url) == 0
    assert check_outputs(manifest)["states"] == {"done": 160}
    stats = emu.stats()
    # 160 requests sharing 3 photos: exactly 3 uploads, one per content.
    assert stats["uploads_by_sha256"] == {sha(a): 1, sha(b): 1, sha(c): 1}
    assert stats["task_errors"] == {}
    by_sha = {u.sha256: u for u in uploads_of(manifest)}
    sent = bodies(manifest)
    assert sent["a000"]["image_urls"] == [by_sha[sha(a)].file_url]
    # Local paths swapped in place; the remote URL passes through untouched, in its position.
    assert sent["m03"]["image_urls"] == [by_sha[sha(b)].file_url, REMOTE, by_sha[sha(c)].file_url]
    assert API_KEY.encode() not in db_of(manifest).read_bytes()

    # Resume with new rows on the same database: the photos are reused, nothing is uploaded again.
    more = [{"id": f"n{i:02d}", "prompt": f"new row {i}", "image_urls": "a.png|b.jpg"} for i in range(20)]
    write_job(tmp_path, rows + more)
    assert await run(manifest, emu.base_url) == 0
    assert check_outputs(manifest)["states"] == {"done": 180}
    assert emu.stats()["uploads"] == 3
    assert bodies(manifest)["n05"]["image_urls"] == [by_sha[sha(a)].file_url, by_sha[sha(b)].file_url]


async def test_upload_gone_on_the_server_is_uploaded_again_on_resume(
        tmp_path: Path, emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    a = photo(tmp_path / "a.png", "red")
    rows = [{"id": f"r{i}", "prompt": f"edit {i}", "image_urls": "a.png"} for i in range(3)]
    manifest = write_job(tmp_path, rows)
    assert await run(manifest, emu.base_url) == 0
    first = uploads_of(manifest)[0]
    # 73 emulated hours pass on the server (our clock does not follow: the upload still looks valid here).
    emu.advance(73 * 3600)
    write_job(tmp_path, [*rows, {"id": "late", "prompt": "edit late", "image_urls": "a.png"}])
    assert await run(manifest, emu.base_url) == 0
    stats = emu.stats()
    assert stats["uploads_by_sha256"] == {sha(a): 2}
    assert stats["task_errors"] == {}  # checked before use: the stale URL was never sent
    assert bodies(manifest)["late"]["image_urls"][0] != first.file_url
    with Store(db_of(manifest)) as store:
        assert store.uploads.current(sha(a)).file_id != first.file_id  # type: ignore[union-attr]


async def test_upload_about_to_expire_is_uploaded_again_before_use(
        tmp_path: Path, emulator_factory: EmulatorFactory) -> None:
    # Uploads live 30 emulated minutes here, less than the hour of margin batchgen wants before reuse.
    emu = await emulator_factory(upload_ttl_s=1800)
    a = photo(tmp_path / "a.png", "red")
    manifest = write_job(tmp_path, [{"id": "one", "prompt": "edit one", "image_urls": "a.png"}])
    assert await run(manifest, emu.base_url) == 0
    write_job(tmp_path, [{"id": "one", "prompt": "edit one", "image_urls": "a.png"},
                         {"id": "two", "prompt": "edit two", "image_urls": "a.png"}])
    assert await run(manifest, emu.base_url) == 0
    stats = emu.stats()
    assert stats["uploads_by_sha256"] == {sha(a): 2}
    assert stats["task_errors"] == {}
    sent = bodies(manifest)
    assert sent["one"]["image_urls"] != sent["two"]["image_urls"]


async def test_stale_upload_behind_image_processing_error_is_checked_and_uploaded_again(
        tmp_path: Path, emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    a = photo(tmp_path / "a.png", "red")
    with Store(tmp_path / "s.db") as store:
        async with EvolinkClient(emu.base_url, emu.base_url, API_KEY) as client:
            uploader = Uploader(store, client, FAST_TIME_SCALE)
            req = request_stub()
            url1 = await uploader.url_for(a, req)
            assert await uploader.url_for(a, req) == url1  # reused within the run
            assert uploader.reference_failed({"image_urls": [REMOTE]}, time.time()) is False  # not ours
            sent_at = time.time()
            emu.advance(73 * 3600)  # the file expires on the server while a task using it runs
            assert uploader.reference_failed({"prompt": "x", "image_urls": [REMOTE, url1]}, sent_at) is True
            url2 = await uploader.url_for(a, req)  # checked: gone, so uploaded again
            assert url2 != url1
            assert emu.stats()["uploads_by_sha256"] == {sha(a): 2}
            # The new upload is fine; a task failing with it right after a check blames the image, not us.
            sent_at = time.time()
            assert uploader.reference_failed({"image_urls": [url2]}, sent_at) is True  # first doubt: suspect
            assert await uploader.url_for(a, req) == url2  # checked: still there, kept
            # A task sent before that check failing now raises no new doubt, but is worth one more attempt.
            assert uploader.reference_failed({"image_urls": [url2]}, sent_at) is True
            assert await uploader.url_for(a, req) == url2
            assert uploader.reference_failed({"image_urls": [url2]}, time.time()) is False
            assert emu.stats()["uploads"] == 2


async def test_image_processing_error_retries_once_then_fails_when_the_upload_is_fine(
        tmp_path: Path, emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(rules=[{"prompt": "flaky", "fail_with": "image_processing_error", "times": 1},
                                        {"prompt": "broken", "fail_with": "image_processing_error"}])
    photo(tmp_path / "a.png", "red")
    manifest = write_job(tmp_path, [{"id": "flaky", "prompt": "flaky edit", "image_urls": "a.png"},
                                    {"id": "broken", "prompt": "broken edit", "image_urls": "a.png"}],
                         run={"max_attempts": 5})
    assert await run(manifest, emu.base_url) == 1
    with Store(db_of(manifest)) as store:
        recs = {r.item_id: r for r in store.iter_requests()}
    assert recs["flaky"].state == "done" and len(recs["flaky"].attempt_rows) == 2
    # The upload was proven fetchable after the first failure: the second one fails for good, well before
    # max_attempts, with the API's code.
    assert recs["broken"].state == "failed" and recs["broken"].error_code == "image_processing_error"
    assert len(recs["broken"].attempt_rows) == 2
    assert emu.stats()["uploads"] == 1


async def foreign_upload(base_url: str, path: Path) -> str:
    """A file in the account that batchgen did not upload (not in its store)."""
    async with EvolinkClient(base_url, base_url, API_KEY) as client:
        return (await client.upload_file(path)).file_id


def live_files(emu: Any) -> dict[str, dict[str, Any]]:
    return {f["file_id"]: f for f in emu.state.files.listing()}


async def test_full_quota_deletes_only_batchgens_unneeded_uploads(
        tmp_path: Path, emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(files_quota=3)
    foreign = await foreign_upload(emu.base_url, photo(tmp_path / "mine.png", "white"))
    photos = [photo(tmp_path / f"p{i}.png", colour) for i, colour in enumerate(["red", "blue", "green", "navy"])]
    rows = [{"id": f"p{i}_{k}", "prompt": f"photo {i} scene {k}", "image_urls": p.name}
            for i, p in enumerate(photos) for k in range(2)]
    manifest = write_job(tmp_path, rows, run={"concurrency": 8})
    assert await run(manifest, emu.base_url) == 0
    assert check_outputs(manifest)["states"] == {"done": 8}
    stats = emu.stats()
    # Two free slots for four photos: each still uploaded once, room made by deleting batchgen's own files.
    assert stats["uploads_by_sha256"] == {sha(p): 1 for p in photos} | {sha(tmp_path / "mine.png"): 1}
    assert stats["files_deleted"] >= 2
    assert stats["requests_by_route"]["POST /api/v1/files/upload/stream"].get("400", 0) >= 1  # 40003 seen
    files = live_files(emu)
    assert files[foreign]["live"] and not files[foreign]["deleted"]
    with Store(db_of(manifest)) as store:
        ours = {u.file_id for u in store.uploads.live()} | {f for f, v in files.items() if v["deleted"]}
    assert foreign not in ours


@pytest.mark.parametrize(("config", "api_message"), [
    ({"files_quota": 1}, "File quota exceeded"),
    ({"max_upload_bytes": 200}, "File too large"),
])
async def test_files_api_refusal_fails_the_request_it_blocks_with_the_apis_message(
        tmp_path: Path, emulator_factory: EmulatorFactory, config: dict[str, Any], api_message: str) -> None:
    emu = await emulator_factory(**config)
    foreign = await foreign_upload(emu.base_url, photo(tmp_path / "tiny.png", "white"))  # fills quota 1
    photo(tmp_path / "big.jpg", "red")
    rows = [{"id": "blocked", "prompt": "edit the big photo", "image_urls": "big.jpg"},
            {"id": "remote", "prompt": "edit a remote photo", "image_urls": REMOTE}]
    manifest = write_job(tmp_path, rows)
    assert await run(manifest, emu.base_url) == 1
    with Store(db_of(manifest)) as store:
        recs = {r.item_id: r for r in store.iter_requests()}
    assert recs["remote"].state == "done"
    blocked = recs["blocked"]
    assert blocked.state == "failed" and not blocked.attempt_rows  # nothing was submitted, nothing charged
    assert api_message in (blocked.error_message or "")
    assert 'request "blocked"' in (blocked.error_message or "") and "big.jpg" in (blocked.error_message or "")
    assert not live_files(emu)[foreign]["deleted"]


async def test_upload_server_errors_are_retried(tmp_path: Path, emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(faults={"upload": {"http_503": 0.5}, "retry_after_s": 1})
    photos = [photo(tmp_path / f"p{i}.png", colour) for i, colour in enumerate(["red", "blue", "green", "navy"])]
    rows = [{"id": f"p{i}", "prompt": f"photo {i}", "image_urls": p.name} for i, p in enumerate(photos)]
    manifest = write_job(tmp_path, rows, run={"max_attempts": 10})
    assert await run(manifest, emu.base_url) == 0
    stats = emu.stats()
    assert stats["faults_injected"]  # some uploads were refused with 503 and tried again
    assert stats["uploads_by_sha256"] == {sha(p): 1 for p in photos}


def test_edit_products_example_runs_end_to_end_on_the_emulator(tmp_path: Path) -> None:
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    manifest = tmp_path / "examples" / "edit_products.yaml"
    result = CliRunner().invoke(main, ["run", str(manifest), "--emulator", "--json", "--time-scale", "0.01"])
    assert result.exit_code == 0, result.output
    summary = [json.loads(line) for line in result.output.splitlines() if '"event":"summary"' in line][-1]
    assert summary["done"] == summary["total"] == 8 and summary["images"] == 8
    with Store(db_of(manifest)) as store:
        ups = store.uploads.live()
        assert sorted(Path(u.path or "").name for u in ups) == ["backpack.jpg", "lamp.png", "mug.png", "sneaker.jpg"]
        urls = {u.file_url for u in ups}
        for rec in store.iter_requests():
            assert rec.state == "done"
            assert set(rec.attempt_rows[-1].body["image_urls"]) <= urls  # type: ignore[index]


def test_upgrade_from_m002_adds_the_uploads_table(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite_utils.Database(path)
    migration_set().apply(db, stop_before="m003_uploads")
    # As a real sync left it: the job row and its requests stamped with the job's generation.
    db.execute("INSERT INTO job (id, name, sync_gen) VALUES (1, 'old', 1)")
    db.execute("INSERT INTO requests (key, item_id, params, model, sync_gen) "
               "VALUES ('k1', 'i1', '{}', 'z-image-turbo', 1)")
    db.conn.commit()
    db.close()
    with Store(path) as store:
        assert "m003_uploads" in store.applied_migrations()
        assert store.counts()["pending"] == 1
        assert store.uploads.live() == [] and store.uploads.current("0" * 64) is None


async def test_upload_retries_do_not_use_up_the_requests_submissions(tmp_path: Path,
                                                                      emulator_factory: EmulatorFactory) -> None:
    # max_attempts 1: each request may be submitted once. Refused uploads happen before any submission and
    # cost nothing, so they are retried on their own count instead of failing the request.
    emu = await emulator_factory(seed=2, faults={"upload": {"http_503": 0.6}, "retry_after_s": 0.5})
    p = photo(tmp_path / "shared.png", "red")
    rows = [{"id": f"r{i}", "prompt": f"scene {i}", "image_urls": p.name} for i in range(3)]
    manifest = write_job(tmp_path, rows, run={"max_attempts": 1})
    assert await run(manifest, emu.base_url) == 0
    stats = emu.stats()
    assert stats["faults_injected"]
    assert stats["uploads_by_sha256"] == {sha(p): 1}
    assert stats["tasks_created"] == 3
