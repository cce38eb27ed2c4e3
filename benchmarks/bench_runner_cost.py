"""Scenario 3 — the runner's own cost: CPU time per image and peak memory, with the API out of the way.

A batch runner should be limited by the API, never by itself. To see its own cost, take the API's limits
away: the emulator has no rate limit and every task takes 50 ms (`latency_s` at a tiny time scale), and the
runner gets `--rate 100000/s` and `--concurrency 1000`. N = 20,000 one-image requests (`--quick`: 2,000),
each submitted, polled (in batches), downloaded to disk and recorded — the whole life of an image.

The figure is the user + sys CPU time of the `batchgen run` process alone (`os.wait4` on that child; the
emulator is another process on the other core), divided by N. It includes interpreter start-up, the
manifest expansion into the store and the export at the end, so it is what a user pays. Target: at most
1 ms of CPU per image. Peak memory is the child's `ru_maxrss`.

For reference, a second run of the same command on the finished job (nothing left to do) gives the fixed
cost of a run: start-up, the fingerprint check and the end-of-run export of the whole job (most of it);
it is reported, not subtracted.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.harness import Row, check, emulator, fresh_dir, median, run_batchgen, write_csv

TIME_SCALE = 0.001
LATENCY_EMULATED_S = 50.0  # x 0.001 = 50 ms of real time per task
TARGET_MS = 1.0


def one_run(workdir: Path, n: int) -> dict[str, float]:
    fresh_dir(workdir)
    manifest = write_csv(workdir / "cost.csv", n)
    with emulator(workdir, time_scale=TIME_SCALE, seed=3, scenario={"latency_s": LATENCY_EMULATED_S}) as emu:
        result = check(run_batchgen(manifest, emu, workdir, rate="100000/s", concurrency=1000,
                                    time_scale=TIME_SCALE, timeout_s=600), "batchgen run")
        again = check(run_batchgen(manifest, emu, workdir, rate="100000/s", concurrency=1000,
                                   time_scale=TIME_SCALE, timeout_s=120), "batchgen run (nothing left)")
    return {"cpu_ms": 1000 * result.cpu_s / n, "user_ms": 1000 * result.user_s / n,
            "sys_ms": 1000 * result.sys_s / n, "rss_mb": result.max_rss_mb, "wall_s": result.wall_s,
            "fixed_cpu_s": again.cpu_s, "fixed_rss_mb": again.max_rss_mb}


def run(workdir: Path, *, quick: bool, runs: int) -> list[Row]:
    n = 2000 if quick else 20_000
    results = [one_run(workdir / f"run{i}", n) for i in range(runs)]

    def col(name: str) -> list[float]:
        return [r[name] for r in results]

    cpu = median(col("cpu_ms"))
    return [
        Row("3 runner cost", f"CPU per image, N={n:,}", cpu, "ms", f"<= {TARGET_MS:g} ms", cpu <= TARGET_MS,
            bound=f"{TARGET_MS:g} ms", ratio=cpu / TARGET_MS, runs=col("cpu_ms"),
            note=f"user {median(col('user_ms')):.2f} + sys {median(col('sys_ms')):.2f} ms; "
                 f"{n / median(col('wall_s')):.0f} images/s; "
                 f"a run with nothing left: {median(col('fixed_cpu_s')):.2f} s CPU"),
        Row("3 runner cost", f"peak memory, N={n:,}", median(col("rss_mb")), "MB", "", None, runs=col("rss_mb"),
            note=f"a run with nothing left: {median(col('fixed_rss_mb')):.0f} MB"),
    ]
