"""Acceptance: the configured rate is never exceeded (the emulator's busiest second stays within the rate
plus the limiter's one-second burst), and against a server whose limit is below the configured rate the
run still finishes, slowing down on the few 429s it gets instead of hammering."""

from __future__ import annotations

from pathlib import Path

from tests.emulator_fixtures import EmulatorFactory
from tests.run_support import check_outputs, prompts, run, write_job


async def test_busiest_second_stays_within_the_rate(tmp_path: Path, emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    manifest = write_job(tmp_path, prompts(90), run={"rate": "30/s", "concurrency": 40})
    assert await run(manifest, emu.base_url) == 0
    stats = emu.stats()
    assert stats["max_requests_in_1s"] <= 30 + 30  # rate + one second's burst
    assert stats["rate_limited"] == 0
    assert check_outputs(manifest)["states"] == {"done": 90}


async def test_server_limit_below_the_configured_rate(tmp_path: Path, emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(rate_limit=20)
    # The server's limit and its Retry-After run in real time while max_wait shrinks with the time scale
    # (5 min x 0.01 = 3 s): give polls held back by 429s room to finish in this run.
    manifest = write_job(tmp_path, prompts(100), run={"rate": "30/s", "concurrency": 40, "max_wait": "60m"})
    assert await run(manifest, emu.base_url) == 0
    stats = emu.stats()
    assert check_outputs(manifest)["states"] == {"done": 100}
    # The excess is about the limiter's first burst (one second of the configured rate) and one step of
    # its multiplicative decrease; after that it runs below the server's limit, so the count does not grow
    # with the job.
    assert stats["rate_limited"] <= 40, stats
