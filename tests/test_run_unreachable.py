"""An unreachable API says nothing about the requests: the run stops resumably (exit 3) without failing
them or charging them attempts, whether the API was never there (wrong --api-base, network down) or went
away in the middle of the run."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from batchgen.results.status import collect
from tests.emulator_fixtures import EmulatorProcess
from tests.run_support import db_of, prompts, run, write_job

CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens there


async def test_wrong_api_base_stops_before_anything_is_sent(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_job(tmp_path, prompts(6))
    assert await run(manifest, CLOSED) == 3
    status = collect(db_of(manifest))
    assert (status["pending"], status["failed"], status["in_flight"]) == (6, 0, 0)
    assert "cannot reach the API" in capsys.readouterr().out


async def test_api_lost_mid_run_stops_resumably_without_failing_requests(
        tmp_path: Path, emulator_process: Callable[..., EmulatorProcess]) -> None:
    emu = emulator_process(time_scale=0.05)
    manifest = write_job(tmp_path, [dict(r, model="gpt-image-1") for r in prompts(40)],
                         run={"rate": "100/s", "concurrency": 10, "max_attempts": 1})
    job = asyncio.ensure_future(run(manifest, emu.base_url))
    for _ in range(400):  # until the API holds some of our tasks
        await asyncio.sleep(0.02)
        if (await asyncio.to_thread(emu.stats))["tasks_created"] >= 5:
            break
    emu.stop()
    assert await asyncio.wait_for(job, 60) == 3
    status = collect(db_of(manifest))
    assert status["failed"] == 0  # max_attempts 1, yet nothing was failed for the outage
    assert status["last_run"]["reason"] == "unreachable"
    assert status["pending"] + status["in_flight"] == 40 - status["done"]
