"""Where a downloaded image is checked and written (engine/intake.py, `Placement`): a small image on a quick
local disk on the event loop, anything else on the intake threads; a disk that turns slow sends the
intakes back to the threads, and a probe brings them back once it is quick again. Both ways store every
image exactly once."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from batchgen.engine import intake
from batchgen.engine.intake import (
    INLINE_MAX_BYTES,
    INLINE_MAX_PIXELS,
    INLINE_MAX_S,
    PROBE_EVERY,
    SLOW_IN_A_ROW,
    Placement,
)
from batchgen.storage import local
from batchgen.storage.base import Storage
from batchgen.storage.local import LocalStorage
from batchgen.storage.outputs import ImageInfo
from batchgen.storage.s3 import S3Storage
from tests.emulator_fixtures import EmulatorFactory
from tests.run_support import check_outputs, prompts, run, write_job


def _info(width: int, height: int) -> ImageInfo:
    return ImageInfo("PNG", width, height, "0" * 64, 600)


def test_only_small_images_on_a_local_disk_are_taken_in_on_the_loop(tmp_path: Path) -> None:
    on_disk = Placement(LocalStorage(tmp_path))
    assert on_disk.try_on_loop(600) and on_disk.try_on_loop(INLINE_MAX_BYTES)
    assert not on_disk.try_on_loop(INLINE_MAX_BYTES + 1)
    assert on_disk.small(_info(128, 128)) and INLINE_MAX_PIXELS == 128 * 128
    assert not on_disk.small(_info(129, 128)) and not on_disk.small(_info(1024, 1024))
    # A bucket's write waits on the network: never on the loop, however small the image.
    assert S3Storage.writes_are_local is False and LocalStorage.writes_are_local is True
    assert not Placement(cast(Storage, SimpleNamespace(writes_are_local=False))).try_on_loop(600)


def test_a_slow_disk_sends_the_intakes_to_the_threads_and_a_probe_brings_them_back(tmp_path: Path) -> None:
    place = Placement(LocalStorage(tmp_path))
    place.took(0.05)  # the first intake of a run (Pillow's plugins imported) or one slow fsync: no change
    place.took(0.0003)
    assert place.try_on_loop(600)
    for _ in range(SLOW_IN_A_ROW):  # the disk turned slow
        assert place.try_on_loop(600)
        place.took(4 * INLINE_MAX_S)
    decisions = [place.try_on_loop(600) for _ in range(2 * PROBE_EVERY)]
    # Off the loop, but for one probe on the loop every PROBE_EVERY small images.
    assert decisions.count(True) == 2 and decisions[PROBE_EVERY - 1] and decisions[2 * PROBE_EVERY - 1]
    place.took(4 * INLINE_MAX_S)  # a slow probe: still off the loop
    assert not place.try_on_loop(600)
    place.took(0.0003)  # a quick probe: back on the loop
    assert place.try_on_loop(600) and place.try_on_loop(600)


def _record_write_threads(monkeypatch: pytest.MonkeyPatch, delay_s: float = 0.0) -> list[str]:
    """Make the local storage's writes note the thread they ran on (and take `delay_s` longer)."""
    names: list[str] = []
    real = local.write_atomic

    def write_atomic(target: Path, data: bytes, *, make_parent: bool = True, durable: bool = True) -> None:
        names.append(threading.current_thread().name)
        if delay_s:
            time.sleep(delay_s)
        real(target, data, make_parent=make_parent, durable=durable)

    monkeypatch.setattr(local, "write_atomic", write_atomic)
    return names


async def test_emulator_images_are_stored_from_the_event_loop(
        tmp_path: Path, emulator_factory: EmulatorFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    emu = await emulator_factory()
    threads = _record_write_threads(monkeypatch)
    manifest = write_job(tmp_path, prompts(30))
    assert await run(manifest, emu.base_url) == 0
    assert check_outputs(manifest)["images"] == 30
    assert threads == [threading.current_thread().name] * 30  # the loop's thread, no hop to another


async def test_with_a_slow_disk_images_are_stored_from_the_intake_threads(
        tmp_path: Path, emulator_factory: EmulatorFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    emu = await emulator_factory()
    threads = _record_write_threads(monkeypatch, delay_s=4 * INLINE_MAX_S)
    manifest = write_job(tmp_path, prompts(40))
    assert await run(manifest, emu.base_url) == 0
    assert check_outputs(manifest)["images"] == 40
    loop_thread = threading.current_thread().name
    # SLOW_IN_A_ROW slow writes on the loop send the rest to the threads (no probe within 40 images).
    assert threads[:SLOW_IN_A_ROW] == [loop_thread] * SLOW_IN_A_ROW
    assert len(threads) == 40 and all(name.startswith("batchgen-intake") for name in threads[SLOW_IN_A_ROW:])


async def test_images_too_large_for_the_loop_are_stored_from_the_intake_threads(
        tmp_path: Path, emulator_factory: EmulatorFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    emu = await emulator_factory()
    threads = _record_write_threads(monkeypatch)
    monkeypatch.setattr(intake, "INLINE_MAX_PIXELS", 8 * 8)  # every emulator image is "large" now
    manifest = write_job(tmp_path, prompts(20))
    assert await run(manifest, emu.base_url) == 0
    assert check_outputs(manifest)["images"] == 20
    assert len(threads) == 20 and all(name.startswith("batchgen-intake") for name in threads)
