"""Scenario 6 — rate control (issue 12): does batchgen find the server's real limit and hold it?

The emulator runs a gateway-style token bucket (burst 10, `rate_limit_burst`) on every API route, in real
time. Two set-ups, each one batchgen process against one emulator process:

* **6a, --rate equal to the server's limit**: 1,500 one-image requests at R = 100/s against a 100/s
  server, emulated latency drawn uniformly from 2-6 s at time scale 0.5 (1-3 s real, median 2 s).
  Bound: `N x 1.02 / R + median latency` (one submission per image plus a fiftieth of a batch poll, then
  one generation latency); ratio = bound / makespan (>= 0.9 on target). Also the share of calls answered
  429 (at most 2%).
* **6b, --rate four times the server's limit**: 600 requests at --rate 40/s against a 10/s server, same
  latency. The share of calls answered 429 (at most 5%), and the share of the server's budget used
  between the first and the last accepted submission (at least 85%): accepted API calls in that span /
  (10/s x the span), from the emulator's 0.1 s timeline.

Concurrency is the job size, so the limiter, not the in-flight cap, is what paces the run. The makespan is
the runner process's wall time, from fork to exit (start-up, the credit check, every call, the downloads).

The plot (`docs/ratecontrol.png`; written where `BENCH_PLOT` says, else into the work directory; needs the
`bench` extra, matplotlib) shows, for the first run of each set-up, the calls per second the server
accepted and refused, the limiter's effective rate (the runner's `--json` `rate` events) and the server's
limit, on the same axes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from benchmarks.harness import RUNNER_SRC, Row, check, emulator, fresh_dir, median, run_batchgen, write_csv

SERVER_BURST = 10
TIME_SCALE = 0.5
LATENCY_RANGE_S = (2.0, 6.0)  # emulated; x 0.5 = 1-3 s real
MEDIAN_LATENCY_S = 2.0  # real


def timeline_figures(stats: dict[str, Any], server_rate: float) -> dict[str, float]:
    """429 share overall, and budget use between the first and the last accepted submission."""
    rows = stats["timeline"]
    bin_s = float(stats["timeline_bin_s"])
    accepted = sum(r[1] for r in rows)
    limited = sum(r[2] for r in rows)
    submit_bins = [r[0] for r in rows if r[3]]
    first, last = min(submit_bins), max(submit_bins)
    in_span = sum(r[1] for r in rows if first <= r[0] <= last)
    span_s = (last - first + 1) * bin_s
    return {"share_429": limited / max(1, accepted + limited), "http_429": float(limited),
            "accepted": float(accepted), "budget_between": in_span / (server_rate * span_s),
            "submit_span_s": span_s}


def one_run(workdir: Path, n: int, rate: float, server_rate: float) -> tuple[dict[str, float], dict[str, Any]]:
    fresh_dir(workdir)
    manifest = write_csv(workdir / "rate.csv", n)
    scenario = {"rate_limit": server_rate, "rate_limit_burst": SERVER_BURST,
                "latency_range_s": list(LATENCY_RANGE_S)}
    with emulator(workdir, time_scale=TIME_SCALE, seed=1, scenario=scenario) as emu:
        result = check(run_batchgen(manifest, emu, workdir, rate=f"{rate:g}/s", concurrency=min(n, 1000),
                                    time_scale=TIME_SCALE, timeout_s=120 + 6 * n / server_rate), "batchgen run")
        stats = emu.stats()
    figures = timeline_figures(stats, server_rate)
    figures["makespan_s"] = result.wall_s
    figures["cpu_ms_per_image"] = 1000 * result.cpu_s / n
    trace = {"timeline": stats["timeline"], "bin_s": stats["timeline_bin_s"], "events": result.events(),
             "server_rate": server_rate, "rate": rate, "n": n}
    return figures, trace


def run(workdir: Path, *, quick: bool, runs: int) -> list[Row]:
    n_a, n_b = (300, 150) if quick else (1500, 600)
    a = [one_run(workdir / f"a{i}", n_a, 100.0, 100.0) for i in range(runs)]
    b = [one_run(workdir / f"b{i}", n_b, 40.0, 10.0) for i in range(runs)]
    plot([a[0][1], b[0][1]], Path(os.environ.get("BENCH_PLOT") or workdir / "ratecontrol.png"))

    def col(results: list[tuple[dict[str, float], dict[str, Any]]], name: str) -> list[float]:
        return [r[0][name] for r in results]

    bound_a = n_a * 1.02 / 100.0 + MEDIAN_LATENCY_S
    ratios = [bound_a / m for m in col(a, "makespan_s")]
    ratio, share_a = median(ratios), median(col(a, "share_429"))
    share_b, budget_b = median(col(b, "share_429")), median(col(b, "budget_between"))
    who = " (runner: BENCH_RUNNER_SRC)" if RUNNER_SRC else ""
    return [
        Row("6a rate = limit", f"makespan, N={n_a}, R=100/s, server 100/s burst 10{who}", median(col(a, "makespan_s")),
            "s", "ratio >= 0.9", ratio >= 0.9, bound=f"{bound_a:.1f} s", ratio=ratio, runs=col(a, "makespan_s"),
            note=f"bound = N x 1.02 / R + median latency {MEDIAN_LATENCY_S:g} s; ratios {_list(ratios)}"),
        Row("6a rate = limit", "share of calls answered 429", 100 * share_a, "%", "<= 2%", share_a <= 0.02,
            runs=[100 * v for v in col(a, "share_429")],
            note=f"429s per run {_list(col(a, 'http_429'), 0)}; budget used between first and last submission "
                 f"{median(col(a, 'budget_between')):.2f}"),
        Row("6b rate = 4 x limit", f"share of calls answered 429, N={n_b}, --rate 40/s, server 10/s{who}",
            100 * share_b, "%", "<= 5%", share_b <= 0.05, runs=[100 * v for v in col(b, "share_429")],
            note=f"429s per run {_list(col(b, 'http_429'), 0)}"),
        Row("6b rate = 4 x limit", "server budget used, first to last submission", budget_b, "", ">= 0.85",
            budget_b >= 0.85, bound="1.0", ratio=budget_b, runs=col(b, "budget_between"),
            note=f"accepted calls / (10/s x span); span {median(col(b, 'submit_span_s')):.1f} s; makespan "
                 f"{median(col(b, 'makespan_s')):.1f} s"),
    ]


def _list(values: list[float], digits: int = 2) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def plot(traces: list[dict[str, Any]], path: Path) -> None:
    """Calls/s accepted and refused (server side), limiter rate and server limit, one panel per set-up."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("ratecontrol: no plot (pip install -e '.[bench]' for matplotlib)", file=sys.stderr)
        return
    fig, axes = plt.subplots(len(traces), 1, figsize=(10, 4.2 * len(traces)))
    for ax, trace in zip(axes, traces, strict=True):
        bin_s = float(trace["bin_s"])
        per_s: dict[int, list[int]] = {}
        for b, ok, refused, _ in trace["timeline"]:
            row = per_s.setdefault(int(b * bin_s * 2), [0, 0])  # half-second bins, shown per second
            row[0] += ok
            row[1] += refused
        seconds = sorted(per_s)
        t0 = seconds[0] / 2
        xs = [s / 2 - t0 for s in seconds]
        ax.step(xs, [2 * per_s[s][0] for s in seconds], where="post", label="accepted calls/s (server)")
        ax.step(xs, [2 * per_s[s][1] for s in seconds], where="post", color="tab:red", label="429s/s (server)")
        # The limiter's effective rate from the runner's events, aligned on the first accepted submission.
        events = trace["events"]
        first_submit = next((e["t"] for e in events if e.get("event") == "submitted"), None)
        submit_bins = [b for b, _, _, subs in trace["timeline"] if subs]
        if first_submit is not None and submit_bins:
            offset = min(submit_bins) * bin_s - t0 - first_submit
            points = [(e["t"] + offset, e["effective_rate"]) for e in events
                      if e.get("event") in ("rate", "summary") and "effective_rate" in e]
            if points:
                ax.step([p[0] for p in points], [p[1] for p in points], where="post", color="tab:green",
                        linewidth=2, label="limiter effective rate")
        ax.axhline(trace["server_rate"], color="black", linestyle="--", label="server limit (token bucket)")
        if trace["rate"] != trace["server_rate"]:
            ax.axhline(trace["rate"], color="grey", linestyle=":", label="--rate")
        ax.set_title(f"N={trace['n']}, --rate {trace['rate']:g}/s, server {trace['server_rate']:g}/s burst "
                     f"{SERVER_BURST}")
        ax.set_xlabel("seconds since the first API call")
        ax.set_ylabel("calls per second")
        ax.set_ylim(bottom=0)
        ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"ratecontrol: plot written to {path}", file=sys.stderr)
