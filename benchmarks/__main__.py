"""`python -m benchmarks`: run the scenarios, print one table, optionally save it as JSON or Markdown.

Each scenario module has `run(workdir, quick=, runs=) -> list[Row]`; every figure is the median of `--runs`
runs (default 3) and every ratio is computed from figures measured in the same run. `--quick` shrinks N so
the whole pass is a smoke check of a few minutes. Exit status: 0 when every target is met, 1 when one is
missed, 2 when a scenario could not run at all (its error is printed; the others still run).
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks.harness import REPO, Row, fmt, machine, median

SCENARIOS: dict[str, str] = {
    "throughput": "benchmarks.bench_throughput",
    "polls": "benchmarks.bench_polls",
    "cost": "benchmarks.bench_runner_cost",
    "scale": "benchmarks.bench_scale",
    "resume": "benchmarks.bench_resume",
    "shared": "benchmarks.bench_shared",
    "ratecontrol": "benchmarks.bench_ratecontrol",
    "keys": "benchmarks.bench_keys",
    "emulator": "",  # benchmarks/bench_emulator.py, the emulator's own benchmark, as one more row
}


def emulator_row(workdir: Path, *, quick: bool, runs: int) -> list[Row]:
    """Runs the emulator engineer's benchmark as is and reads its requests/s (target: at least 2,000)."""
    values: list[float] = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_emulator.py"), "--seconds",
                              "4" if quick else "10"], capture_output=True, text=True, cwd=REPO, timeout=300)
        match = re.search(r"= (\d+) requests/s", out.stdout)
        if match is None:
            raise RuntimeError(f"bench_emulator.py gave no figure:\n{out.stdout[-1000:]}{out.stderr[-1000:]}")
        values.append(float(match.group(1)))
    rps = median(values)
    return [Row("0 emulator", "emulator requests/s (bench_emulator.py)", rps, "req/s", ">= 2000", rps >= 2000,
                bound="2,000 req/s", ratio=rps / 2000, runs=values, note="so it is never the bottleneck")]


def verdict(row: Row) -> str:
    return "" if row.passed is None else ("PASS" if row.passed else "MISS")


def render_text(rows: list[Row]) -> str:
    head = ("scenario", "figure", "value", "bound", "ratio", "target", "result", "note")
    table = [head] + [(r.scenario, r.figure, fmt(r.value, r.unit), r.bound,
                       "" if r.ratio is None else f"{r.ratio:.2f}", r.target, verdict(r), r.note) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(head) - 1)]
    lines = []
    for line in table:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(line[:-1], widths, strict=True)) + "  " + line[-1])
        if line is head:
            lines.append("-" * (sum(widths) + 2 * len(widths) + 4))
    return "\n".join(lines)


def render_markdown(rows: list[Row]) -> str:
    lines = ["| scenario | figure | value | bound | ratio | target | result | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}"
        lines.append(f"| {r.scenario} | {r.figure} | {fmt(r.value, r.unit)} | {r.bound} | {ratio} | {r.target} | "
                     f"{verdict(r)} | {r.note} |")
    return "\n".join(lines)


def _save(path: Path, args: argparse.Namespace, rows: list[Row], broken: list[str]) -> None:
    path.write_text(json.dumps({"machine": machine(), "quick": args.quick, "runs": args.runs,
                                "rows": [r.to_dict() for r in rows], "broken": broken}, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller N: a smoke pass of a few minutes")
    parser.add_argument("--only", action="append", choices=sorted(SCENARIOS), metavar="NAME",
                        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure; the median is shown (default 3)")
    parser.add_argument("--workdir", type=Path, help="keep work files here (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="also write the rows and the machine to this JSON file")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown too")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    names = args.only or list(SCENARIOS)
    rows: list[Row] = []
    broken: list[str] = []
    with tempfile.TemporaryDirectory(prefix="batchgen-bench-") as tmp:
        base = args.workdir or Path(tmp)
        for name in names:
            started = time.monotonic()
            print(f"== {name} ...", file=sys.stderr, flush=True)
            try:
                if name == "emulator":
                    got = emulator_row(base / name, quick=args.quick, runs=args.runs)
                else:
                    module = importlib.import_module(SCENARIOS[name])
                    got = module.run(base / name, quick=args.quick, runs=args.runs)
            except Exception:  # one broken scenario must not hide the others' figures
                traceback.print_exc()
                broken.append(name)
                continue
            rows.extend(got)
            print(f"== {name}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
            print(render_text(got), file=sys.stderr, flush=True)
            if args.json:  # saved after every scenario, so a long pass that is stopped keeps what it measured
                _save(args.json, args, rows, broken)
    info = machine()
    print(f"\nbatchgen benchmarks — {'quick' if args.quick else 'full'} pass, median of {args.runs} run(s); "
          f"{info['nproc']} cores, {info['memory']}, Python {info['python']}, SQLite {info['sqlite']}, "
          f"{info['date']}\n")
    print(render_text(rows))
    if args.markdown:
        print("\n" + render_markdown(rows))
    if broken:
        print(f"\nscenarios that could not run: {', '.join(broken)}")
    if args.json:
        _save(args.json, args, rows, broken)
    if broken:
        return 2
    return 1 if any(r.passed is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
