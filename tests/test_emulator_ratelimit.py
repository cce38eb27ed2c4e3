"""The emulator's rate limits: the sliding window (default) and the token bucket with a burst
(`rate_limit_burst`), the per-bin timeline the benchmarks read, and the latency range override."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from batchgen.emulator import EmulatorConfig
from batchgen.emulator.ratelimit import SlidingWindowLimiter, TokenBucketLimiter
from batchgen.errors import ConfigError
from tests.emulator_fixtures import AUTH, EmulatorFactory


def test_token_bucket_allows_its_burst_then_the_rate() -> None:
    bucket = TokenBucketLimiter(10.0, burst=3)
    assert [bucket.check("k", now=0.0) for _ in range(3)] == [None, None, None]
    wait = bucket.check("k", now=0.0)
    assert wait == pytest.approx(0.1)
    assert bucket.check("k", now=0.05) == pytest.approx(0.05)  # refused calls take no token
    assert bucket.check("k", now=0.1) is None
    assert bucket.check("other", now=0.1) is None  # per key
    # Evenly paced at the rate, a client never runs out: 10/s for 10 s after the burst is gone.
    assert all(bucket.check("k", now=0.2 + i / 10) is None for i in range(100))


def test_a_second_at_once_is_refused_by_the_bucket_but_not_by_the_window() -> None:
    window, bucket = SlidingWindowLimiter(10.0), TokenBucketLimiter(10.0, burst=3)
    assert sum(window.check("k", now=0.0) is None for _ in range(10)) == 10
    assert sum(bucket.check("k", now=0.0) is None for _ in range(10)) == 3


def test_burst_and_latency_range_settings_are_checked(tmp_path: Path) -> None:
    config = EmulatorConfig.from_options(rate_limit=10, rate_limit_burst=10)
    assert (config.rate_limit, config.rate_limit_burst) == (10, 10)
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text("rate_limit: 10\nrate_limit_burst: 10\nlatency_range_s: [2, 6]\n")
    assert EmulatorConfig.from_options(scenario_path=scenario).latency_range_s == (2.0, 6.0)
    bad = (("latency_range_s: [6, 2]\n", "latency_range_s"), ("rate_limit_burst: 0\n", "rate_limit_burst"))
    for text, field in bad:
        scenario.write_text(text)
        with pytest.raises(ConfigError, match=f"scenario.yaml line 1: {field}"):
            EmulatorConfig.from_options(scenario_path=scenario)


async def test_token_bucket_over_http_with_timeline(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(rate_limit=5.0, rate_limit_burst=2, latency_range_s=(2.0, 4.0), time_scale=1.0)
    statuses, retry_after = [], None
    async with aiohttp.ClientSession(headers=AUTH) as session:
        for i in range(4):
            async with session.post(emu.base_url + "/v1/images/generations",
                                    json={"prompt": f"a cat {i}", "model": "z-image-turbo"}) as response:
                statuses.append(response.status)
                if response.status == 429:
                    retry_after = response.headers["Retry-After"]
                else:
                    body = await response.json()
                    assert 2 <= body["task_info"]["estimated_time"] <= 4
    assert statuses[:2] == [200, 200] and 429 in statuses[2:]
    assert retry_after is not None and float(retry_after) >= 0
    stats = emu.stats()
    assert stats["rate_limit_burst"] == 2 and stats["timeline_bin_s"] == 0.1
    accepted = sum(row[1] for row in stats["timeline"])
    limited = sum(row[2] for row in stats["timeline"])
    submits = sum(row[3] for row in stats["timeline"])
    assert (accepted, limited, submits) == (statuses.count(200), statuses.count(429), statuses.count(200))
