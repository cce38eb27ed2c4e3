"""Scenario 1 — throughput against the bound the API's rate limit sets.

With a budget of R requests a second across all API calls, and one submission plus at least one poll per
image, N images cannot finish faster than `2N/R` seconds plus one generation latency: that is the issue's
bound, and the target is a makespan within 10% of it (bound / makespan >= 0.9).

Set-up: N = 3,000 one-image requests (`--quick`: 300) of the emulator's fastest model (latency drawn from
its distribution: median 5 s, 2-20 s emulated) at time scale 0.6, so a median task takes 3 s of real time.
The emulator enforces R = 50 requests/s per key across every API route, as a token bucket with a burst
of 10 (`rate_limit_burst`, what API gateways run; before issue 12 it was a sliding one-second window); the
runner is configured with the same rate. Concurrency 500, enough that in-flight tasks never cap the rate
(R x the longest latency is 50 x 12 s = 600; most finish in about 3 s). The makespan is the runner
process's wall time, from fork to exit: start-up, the credit check, every submission, poll and download.

Batch polling (up to 50 ids a call) lets batchgen spend fewer than 2 requests per image, so it can beat the
"bound"; the table says so rather than hiding it. `requests/image` (accepted API calls per image) explains
the ratio, and `budget used` (accepted API calls / (R x makespan)) is how much of the rate limit the run
actually used — the figure that says how close it runs to the API's limit. `budget used between first and
last submission` counts the same calls only over that span (from the emulator's 0.1 s timeline), leaving
out start-up and the tail of the last generations, when there is nothing left to send.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.bench_ratecontrol import SERVER_BURST, timeline_figures
from benchmarks.harness import Row, check, emulator, fresh_dir, median, run_batchgen, write_csv

RATE = 50.0
TIME_SCALE = 0.6
MEDIAN_LATENCY_S = 5.0 * TIME_SCALE  # z-image-turbo's emulated median latency, scaled
CONCURRENCY = 500
API_PREFIX = ("POST /v1/", "GET /v1/")


def accepted_api_calls(stats: dict[str, object]) -> tuple[int, int]:
    """(accepted API calls, 429s) from the emulator's per-route counters; result downloads do not count."""
    accepted = limited = 0
    by_route = stats["requests_by_route"]
    assert isinstance(by_route, dict)
    for route, statuses in by_route.items():
        if not route.startswith(API_PREFIX):
            continue
        for status, count in statuses.items():
            if status == "429":
                limited += count
            else:
                accepted += count
    return accepted, limited


def one_run(workdir: Path, n: int) -> dict[str, float]:
    fresh_dir(workdir)
    manifest = write_csv(workdir / "throughput.csv", n)
    with emulator(workdir, rate_limit=RATE, time_scale=TIME_SCALE, seed=1,
                  scenario={"rate_limit_burst": SERVER_BURST}) as emu:
        result = check(run_batchgen(manifest, emu, workdir, rate=f"{RATE:g}/s", concurrency=CONCURRENCY,
                                    time_scale=TIME_SCALE, timeout_s=60 + 10 * n / RATE), "batchgen run")
        stats = emu.stats()
    accepted, limited = accepted_api_calls(stats)
    bound = 2 * n / RATE + MEDIAN_LATENCY_S
    return {"makespan_s": result.wall_s, "bound_s": bound, "ratio": bound / result.wall_s,
            "requests_per_image": accepted / n, "http_429": float(limited),
            "budget_used": accepted / (RATE * result.wall_s),
            "budget_between": timeline_figures(stats, RATE)["budget_between"],
            "peak_1s": float(stats["max_requests_in_1s"])}


def run(workdir: Path, *, quick: bool, runs: int) -> list[Row]:
    n = 300 if quick else 3000
    results = [one_run(workdir / f"run{i}", n) for i in range(runs)]

    def col(name: str) -> list[float]:
        return [r[name] for r in results]

    ratio = median(col("ratio"))
    makespan, bound = median(col("makespan_s")), median(col("bound_s"))
    beat = " (beats the 2-requests/image bound: batch polls)" if ratio > 1 else ""
    return [
        Row("1 throughput", f"makespan, N={n}, R={RATE:g}/s", makespan, "s", "ratio >= 0.9", ratio >= 0.9,
            bound=f"{bound:.1f} s", ratio=ratio, runs=col("makespan_s"),
            note=f"bound = 2N/R + median latency {MEDIAN_LATENCY_S:g} s{beat}"),
        Row("1 throughput", "API requests per image", median(col("requests_per_image")), "", "", None,
            bound="2 (issue's model)", runs=col("requests_per_image"),
            note="accepted submits + polls + credit check, per image"),
        Row("1 throughput", "rate budget used", median(col("budget_used")), "", "", None, bound="1.0",
            runs=col("budget_used"), note="accepted API calls / (R x makespan)"),
        Row("1 throughput", "rate budget used, first to last submission", median(col("budget_between")), "",
            ">= 0.95", median(col("budget_between")) >= 0.95, bound="1.0", runs=col("budget_between"),
            note="accepted API calls in that span / (R x span)"),
        Row("1 throughput", "HTTP 429 received", median(col("http_429")), "", "", None, runs=col("http_429"),
            note=f"peak one-second count seen by the server {median(col('peak_1s')):g} (429s included)"),
    ]
