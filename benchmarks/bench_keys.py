"""Scenario 7 — several API keys: the same job with one key and with three keys of equal limit (issue 15).

Each key is its own emulator account with its own limit of R requests a second (a sliding one-second
window); batchgen runs at `--rate R`, which with a key pool is the rate of each key. With one key the job
is bounded by R; with three keys by 3R, so the makespan should drop to about a third. Target: makespan(one
key) / makespan(three keys) >= 2.7. Both runs use the same N, the same emulator settings and the same
concurrency (the job's total, large enough that tasks in flight never cap the rate: 3R x the longest
latency), and are measured in the same pass.

The makespan is the runner process's wall time, fork to exit. `peak 1 s per key` is the highest one-second
count the emulator saw for any one key (refused calls included), next to the key's limit.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    ChildResult,
    EmulatorProcess,
    Row,
    batchgen_cmd,
    check,
    emulator,
    fresh_dir,
    median,
    run_child,
    write_csv,
)

RATE = 20.0
TIME_SCALE = 0.1
CONCURRENCY = 300
KEYS = ["sk-evo-bench-pool-1", "sk-evo-bench-pool-2", "sk-evo-bench-pool-3"]


def _account(key: str) -> str:
    return "u" + hashlib.sha256(key.encode()).hexdigest()[:12]


def one_run(workdir: Path, n: int, keys: list[str]) -> dict[str, float]:
    fresh_dir(workdir)
    manifest = write_csv(workdir / "keys.csv", n)
    scenario: dict[str, Any] = {"accounts": [{"api_key": k, "rate_limit": RATE} for k in KEYS]}
    with emulator(workdir, time_scale=TIME_SCALE, seed=1, scenario=scenario) as emu:
        result = check(_run(manifest, emu, workdir, ",".join(keys), n), f"batchgen run with {len(keys)} key(s)")
        stats = emu.stats()
    per_key = stats["accounts"]
    peak = max(per_key[_account(k)]["max_requests_in_1s"] for k in keys)
    accepted = stats["api_requests"] - stats["rate_limited"]
    return {"makespan_s": result.wall_s, "peak_1s": float(peak), "http_429": float(stats["rate_limited"]),
            "requests_per_image": accepted / n}


def _run(manifest: Path, emu: EmulatorProcess, workdir: Path, keys: str, n: int) -> ChildResult:
    """`batchgen run` like run_batchgen, with the keys in EVOLINK_API_KEYS instead of EVOLINK_API_KEY."""
    env = emu.env()
    env.pop("EVOLINK_API_KEY", None)
    env["EVOLINK_API_KEYS"] = keys
    cmd = batchgen_cmd("run", str(manifest), "--db", str(workdir / "state.db"), "--out", str(workdir / "out"),
                       "--time-scale", repr(TIME_SCALE), "--json", "--rate", f"{RATE:g}/s",
                       "--concurrency", str(CONCURRENCY))
    return run_child(cmd, env=env, timeout_s=60 + 10 * n / RATE, workdir=workdir)


def run(workdir: Path, *, quick: bool, runs: int) -> list[Row]:
    n = 300 if quick else 1200
    one = [one_run(workdir / f"one{i}", n, KEYS[:1]) for i in range(runs)]
    three = [one_run(workdir / f"three{i}", n, KEYS) for i in range(runs)]
    ratios = [a["makespan_s"] / b["makespan_s"] for a, b in zip(one, three, strict=True)]
    ratio = median(ratios)
    m1, m3 = median([r["makespan_s"] for r in one]), median([r["makespan_s"] for r in three])
    return [
        Row("7 keys", f"makespan, N={n}, one key at R={RATE:g}/s", m1, "s", "", None,
            runs=[r["makespan_s"] for r in one], note=f"peak 1 s {median([r['peak_1s'] for r in one]):g} "
            f"(limit {RATE:g}), 429s {median([r['http_429'] for r in one]):g}, API requests/image "
            f"{median([r['requests_per_image'] for r in one]):.2f}"),
        Row("7 keys", f"makespan, N={n}, three keys at R={RATE:g}/s each", m3, "s", "ratio >= 2.7", ratio >= 2.7,
            ratio=ratio, runs=[r["makespan_s"] for r in three],
            note=f"one key / three keys; peak 1 s per key {median([r['peak_1s'] for r in three]):g} "
            f"(limit {RATE:g}), 429s {median([r['http_429'] for r in three]):g}, API requests/image "
            f"{median([r['requests_per_image'] for r in three]):.2f}"),
    ]
