"""The local folder storage and the image intake on top of it: names that leave the folder are refused
(symlinks included), a folder that vanishes mid-run is made again, nothing half-written is ever visible,
and an image that fails its checks is not stored unless the job keeps such images."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

from batchgen.emulator.images import render_png
from batchgen.engine.intake import take_in
from batchgen.models import QualitySettings
from batchgen.storage.local import LocalStorage
from batchgen.storage.outputs import NotAnImageError

GOOD = render_png("a red chair", "1:1", 1)


def blank_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (256, 256), (200, 200, 200)).save(out, format="PNG")
    return out.getvalue()


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_saves_under_its_folder_with_the_extension_of_the_bytes(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "out")
    rel, info = storage.save_image("SKU-1/plain_1", GOOD)
    assert rel == "SKU-1/plain_1.png" and info.format == "PNG"
    assert (tmp_path / "out" / rel).read_bytes() == GOOD
    # The second image into the same folder (checked once) lands beside it; no temporary file is left.
    storage.save_image("SKU-1/plain_2", GOOD)
    assert files_under(tmp_path / "out") == ["SKU-1/plain_1.png", "SKU-1/plain_2.png"]


@pytest.mark.parametrize("name", ["../escape", "/etc/escape", "a/../../escape", "a\x00b", "\\server\\x"])
def test_names_that_leave_the_folder_are_refused_and_nothing_is_written(tmp_path: Path, name: str) -> None:
    storage = LocalStorage(tmp_path / "out")
    with pytest.raises(ValueError):
        storage.save_image(name, GOOD)
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("rel", ["a/..", "a/.", "a/", "", ".."])
def test_a_write_needs_a_file_name(tmp_path: Path, rel: str) -> None:
    with pytest.raises(ValueError):
        LocalStorage(tmp_path / "out").write_path(rel)


def test_a_symlinked_folder_that_leads_outside_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "link").symlink_to(outside, target_is_directory=True)
    storage = LocalStorage(tmp_path / "out")
    with pytest.raises(ValueError, match="leaves the output folder"):
        storage.save_image("link/x", GOOD)
    assert list(outside.iterdir()) == []


def test_a_symlink_in_place_of_the_file_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"keep me")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x.png").symlink_to(victim)
    LocalStorage(tmp_path / "out").save_image("x", GOOD)
    assert victim.read_bytes() == b"keep me"
    assert not (tmp_path / "out" / "x.png").is_symlink()
    assert (tmp_path / "out" / "x.png").read_bytes() == GOOD


def test_a_folder_removed_mid_run_is_made_again(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "out")
    storage.save_image("SKU-1/a", GOOD)
    (tmp_path / "out" / "SKU-1" / "a.png").unlink()
    os.rmdir(tmp_path / "out" / "SKU-1")
    rel, _ = storage.save_image("SKU-1/b", GOOD)
    assert (tmp_path / "out" / rel).read_bytes() == GOOD


def test_intake_stores_a_good_image_once_checked(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "out")
    got = take_in(storage, "a_1", GOOD, "1:1", QualitySettings())
    assert got.rel == "a_1.png" and got.verdict.passed and got.verdict.status == "passed"
    assert (tmp_path / "out" / "a_1.png").read_bytes() == GOOD


def test_intake_does_not_store_an_image_that_failed_unless_the_job_keeps_them(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "out")
    got = take_in(storage, "b_1", blank_png(), "1:1", QualitySettings())
    assert got.rel is None and [f.check for f in got.verdict.failures] == ["blank"]
    assert got.info.format == "PNG" and len(got.info.sha256) == 64  # enough to set it aside by its hash
    assert files_under(tmp_path / "out") == []
    kept = take_in(storage, "b_1", blank_png(), "1:1", QualitySettings(on_fail="keep"))
    assert kept.rel == "b_1.png" and kept.verdict.status == "failed"
    assert files_under(tmp_path / "out") == ["b_1.png"]


def test_intake_with_checks_off_stores_without_a_verdict(tmp_path: Path) -> None:
    got = take_in(LocalStorage(tmp_path / "out"), "c_1", blank_png(), "1:1", QualitySettings(enabled=False))
    assert got.rel == "c_1.png" and got.verdict.status is None


def test_intake_refuses_bytes_that_are_not_an_image_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(NotAnImageError):
        take_in(LocalStorage(tmp_path / "out"), "d_1", b"<html>rate limited</html>", "1:1", QualitySettings())
    assert files_under(tmp_path) == []


def test_a_job_without_a_recorded_folder_is_found_beside_its_database_or_asked_for(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from batchgen.errors import ConfigError
    from batchgen.storage.location import storage_for_job

    beside = SimpleNamespace(job_record=lambda: {}, get_meta=lambda key: None, path=tmp_path / "state.db",
                             location=str(tmp_path / "state.db"))
    assert storage_for_job(beside).location == str(tmp_path)  # type: ignore[arg-type]
    # A shared store (no database file) has no default: the message says what to give, and where.
    shared = SimpleNamespace(job_record=lambda: {}, get_meta=lambda key: None,
                             location="postgresql://db.example/batchgen (job nightly)")
    with pytest.raises(ConfigError, match=r"job nightly\).*no output folder on record.*--out"):
        storage_for_job(shared)  # type: ignore[arg-type]


@pytest.mark.parametrize("durable", [True, False])
def test_an_image_is_fsynced_only_where_the_store_is_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             durable: bool) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    storage = LocalStorage(tmp_path, durable=durable)
    rel, _ = storage.save_image("a/b", GOOD)
    assert (tmp_path / rel).read_bytes() == GOOD and storage.size_of(rel) == len(GOOD)
    assert bool(synced) is durable
    assert storage.size_of("a/missing.png") is None


def test_a_run_on_sqlite_does_not_fsync_each_image(tmp_path: Path) -> None:
    from batchgen.engine.recovery import images_durable
    from batchgen.store.open import open_store

    with open_store(tmp_path / "s.db") as store:
        assert images_durable(store) is False  # SQLite's NORMAL commits: recovery.py checks after a crash
