"""Issue 11: faults of this machine stop the run resumably, never with a traceback.

A full disk under the output folder or under the database, and a `--db` that is not a batchgen database.
The disks are real: small tmpfs mounts (root can mount them; CI runs as root), filled up while the run is
going, then given space again; the next run completes the job with every image exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from batchgen.cli import main
from batchgen.results.status import collect
from batchgen.store.sqlite import Store
from tests.emulator_fixtures import EmulatorFactory
from tests.run_support import check_outputs, db_of, image_files, json_events, prompts, run, write_job


class SmallDisk:
    """A small tmpfs mounted at `path`; `fill()` takes every free byte, `free()` gives it back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / ".filler"

    def fill(self) -> None:
        with self.filler.open("ab", buffering=0) as f:  # unbuffered: closing must not flush into a full disk
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            with contextlib.suppress(OSError):
                os.fsync(f.fileno())

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def small_disk() -> Iterator[Callable[..., SmallDisk]]:
    mounted: list[Path] = []

    def mount(path: Path, size: str = "4m") -> SmallDisk:
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True)
        if done.returncode != 0:
            reason = f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); run as root"
            if os.environ.get("CI"):
                pytest.fail(reason)
            pytest.skip(reason)
        mounted.append(path)
        return SmallDisk(path)

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


async def _when(predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_output_folder_full_stops_resumably_then_completes(
        tmp_path: Path, emulator_factory: EmulatorFactory, small_disk: Callable[..., SmallDisk],
        capsys: pytest.CaptureFixture[str]) -> None:
    emu = await emulator_factory()
    manifest = write_job(tmp_path, prompts(300), run={"rate": "60/s", "concurrency": 20})
    out = tmp_path / "out" / "job"
    disk = small_disk(out)
    job = asyncio.ensure_future(run(manifest, emu.base_url))
    await _when(lambda: len(image_files(out)) >= 5)
    disk.fill()
    assert await job == 3
    summary = json_events(capsys.readouterr().out)[-1]
    assert summary["reason"] == "local_fault"
    assert "no space left on the device" in summary["message"] and str(out) in summary["message"]
    assert not [p for p in out.rglob("*.part")], "a partial file was left behind"
    status = collect(db_of(manifest))
    assert status["failed"] == 0 and status["last_run"]["reason"] == "local_fault"
    disk.free()
    assert await run(manifest, emu.base_url) == 0
    assert check_outputs(manifest)["states"] == {"done": 300}
    assert len({t["idempotency_key"] for t in emu.tasks()}) == len(emu.tasks())  # nothing paid twice


async def test_database_disk_full_stops_resumably_then_completes(
        tmp_path: Path, emulator_factory: EmulatorFactory, small_disk: Callable[..., SmallDisk],
        capsys: pytest.CaptureFixture[str]) -> None:
    emu = await emulator_factory()
    manifest = write_job(tmp_path, prompts(300), run={"rate": "60/s", "concurrency": 20})
    disk = small_disk(tmp_path / "state", "24m")  # room for SQLite's WAL (up to ~4 MB between checkpoints)
    db = disk.path / "job.db"
    out = tmp_path / "out" / "job"
    job = asyncio.ensure_future(run(manifest, emu.base_url, db_path=db))
    await _when(lambda: len(image_files(out)) >= 5)
    disk.fill()
    assert await job == 3
    text = capsys.readouterr().out
    summary = json_events(text)[-1]
    assert summary["reason"] == "local_fault"
    assert "cannot write the database" in summary["message"] and str(db) in summary["message"]
    disk.free()
    assert await run(manifest, emu.base_url, db_path=db) == 0
    assert check_outputs(manifest, db=db)["states"] == {"done": 300}
    assert len({t["idempotency_key"] for t in emu.tasks()}) == len(emu.tasks())


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


@pytest.mark.parametrize("kind", ["text", "other-sqlite", "damaged", "newer"])
def test_a_db_that_is_not_ours_is_refused_and_left_untouched(tmp_path: Path, kind: str) -> None:
    manifest = write_job(tmp_path, prompts(2))
    db = tmp_path / "state.db"
    if kind == "text":
        db.write_text("name,price\nmug,3\n")
    elif kind == "other-sqlite":
        with contextlib.closing(sqlite3.connect(db)) as conn:
            conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
            conn.commit()
    else:
        with Store(db):
            pass
        if kind == "newer":
            with contextlib.closing(sqlite3.connect(db)) as conn:
                conn.execute("INSERT INTO _sqlite_migrations (migration_set, name, applied_at) "
                             "VALUES ('batchgen', 'm099_from_the_future', '2030-01-01')")
                conn.commit()
        else:
            data = bytearray(db.read_bytes())
            data[100:4096 * 2] = os.urandom(4096 * 2 - 100)  # the header stays; the schema pages are garbage
            db.write_bytes(bytes(data))
    before = db.read_bytes()
    for command in (["run", str(manifest), "--emulator", "--db", str(db)], ["status", "--db", str(db)]):
        code, output = _invoke(*command)
        assert code == 2, output
        assert str(db) in output and "Traceback" not in output
        expected = {"text": "not an SQLite file", "other-sqlite": "another program", "damaged": "damaged",
                    "newer": "newer batchgen"}[kind]
        assert expected in output
    assert db.read_bytes() == before
    assert not Path(f"{db}-wal").exists() or kind in ("damaged", "newer")
