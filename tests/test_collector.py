"""The garbage collector's settings for a run (engine/collector.py): seldom collections, none over what
lives for the whole run, and the program's own settings back when the run ends."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchgen.engine import collector
from batchgen.engine.collector import GEN0_THRESHOLD
from tests.emulator_fixtures import EmulatorFactory
from tests.run_support import check_outputs, prompts, run, write_job


@pytest.fixture(autouse=True)
def _collector_as_python_leaves_it() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)
    gc.unfreeze()


def test_a_run_block_collects_seldom_and_gives_the_settings_back() -> None:
    gc.set_threshold(700, 10, 10)
    with collector.seldom_collections():
        assert gc.get_threshold() == (GEN0_THRESHOLD, 10, 10)
        assert gc.get_freeze_count() > 0  # what existed at the start is out of the collector's sight
        with collector.seldom_collections():  # a second run in the same process, at the same time
            pass
        assert gc.get_threshold() == (GEN0_THRESHOLD, 10, 10) and gc.get_freeze_count() > 0  # still the first's
    assert gc.get_threshold() == (700, 10, 10)
    assert gc.get_freeze_count() == 0


def test_a_program_that_switched_collection_off_keeps_it_off() -> None:
    gc.set_threshold(0, 10, 10)
    with collector.seldom_collections():
        assert gc.get_threshold()[0] == 0
    assert gc.get_threshold() == (0, 10, 10)
    gc.set_threshold(50_000, 20, 20)  # a program that already collects more seldom keeps its own threshold
    with collector.seldom_collections():
        assert gc.get_threshold() == (50_000, 20, 20)


async def test_a_run_collects_seldom_while_it_runs_and_restores_after(
        tmp_path: Path, emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    gc.set_threshold(700, 10, 10)
    manifest = write_job(tmp_path, prompts(20))
    seen: list[tuple[int, int]] = []
    job = asyncio.ensure_future(run(manifest, emu.base_url))
    while not job.done():
        seen.append((gc.get_threshold()[0], gc.get_freeze_count()))
        await asyncio.sleep(0.005)
    assert await job == 0
    assert check_outputs(manifest)["images"] == 20
    assert any(threshold == GEN0_THRESHOLD and frozen > 0 for threshold, frozen in seen)
    assert gc.get_threshold() == (700, 10, 10) and gc.get_freeze_count() == 0


def test_the_run_command_collects_seldom_and_skips_the_last_collection(tmp_path: Path) -> None:
    manifest = write_job(tmp_path, prompts(3))
    # Registered first, so it runs last (atexit is last in, first out): what the interpreter's final
    # collection will find. Frozen objects are not walked by it.
    probe = ("import atexit, gc, sys\n"
             "atexit.register(lambda: print('at exit:', gc.get_threshold()[0], gc.get_freeze_count() > 0))\n"
             "from batchgen.cli import main\n"
             "sys.argv = ['batchgen', 'run', sys.argv[1], '--emulator', '--time-scale', '0.01']\n"
             "main()\n")
    done = subprocess.run([sys.executable, "-c", probe, str(manifest)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"at exit: {GEN0_THRESHOLD} True"
    assert check_outputs(manifest)["images"] == 3
