"""Scenario 6 — the shared store (issue 13): PostgreSQL against SQLite, and one runner against two.

Three figures, all reported (no targets; docs/benchmarks.md says what they show on this machine):

* **claims/s and commits/s of the store alone**, in this process, on a throwaway PostgreSQL 15 server on
  loopback (fsync off, as the tests run it) and on a SQLite file: N requests synced, then claimed 50 at a
  time (`next_due` + `start_attempts`: what the submitter does), then one `record_task` transaction per
  attempt (what every answered submit costs).
* **runner CPU per image** on each backend: `batchgen run` with no API limits (the cost scenario's setup,
  N = 5,000 images; `--quick` 1,000), CPU of the runner process only.
* **one runner against two** on an unlimited emulator and a PostgreSQL job: wall time of the same job with
  one `batchgen run`, then with two started together. On a 2-core machine shared with the emulator and the
  database server, two runners cannot be faster by much: this shows the coordination cost, not a speed-up.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from benchmarks.harness import REPO, ChildResult, Row, check, emulator, fresh_dir, median, run_batchgen, write_csv

TIME_SCALE = 0.001
LATENCY_EMULATED_S = 50.0


def _store_rates(db: str | Path, job: str, manifest: Path, n: int) -> tuple[float, float]:
    from batchgen.manifest.load import open_manifest
    from batchgen.store.open import open_store
    from batchgen.store.records import NewAttempt

    with open_store(db, job, create=True) as store:
        store.runners.lock()
        store.sync(open_manifest(manifest))
        started = time.perf_counter()
        ids: list[int] = []
        while True:
            due = store.next_due(50)
            if not due:
                break
            ids += store.start_attempts([NewAttempt(r.key, 1, r.model, 0.5) for r in due])
        claim_s = time.perf_counter() - started
        started = time.perf_counter()
        for i, attempt_id in enumerate(ids):
            store.record_task(attempt_id, f"task-unified-{i}", 0.5, replayed=False)
        commit_s = time.perf_counter() - started
    return len(ids) / claim_s, len(ids) / commit_s


def _runner(manifest: Path, emu: object, workdir: Path, db: str) -> subprocess.Popen[bytes]:
    from benchmarks.harness import batchgen_cmd

    cmd = batchgen_cmd("run", str(manifest), "--db", db, "--out", str(workdir / "out"), "--time-scale",
                       repr(TIME_SCALE), "--json", "--rate", "100000/s", "--concurrency", "1000")
    return subprocess.Popen(cmd, env=emu.env(), cwd=REPO, stdout=subprocess.DEVNULL,  # type: ignore[attr-defined]
                            stderr=subprocess.DEVNULL)


def one_pass(workdir: Path, n_store: int, n_run: int) -> dict[str, float]:
    from tests.pg_fixtures import throwaway_server

    fresh_dir(workdir)
    out: dict[str, float] = {}
    store_csv = write_csv(workdir / "store.csv", n_store)
    run_csv = write_csv(workdir / "run.csv", n_run)
    with throwaway_server() as pg:
        out["pg_claims"], out["pg_commits"] = _store_rates(pg.url(pg.new_database()), "bench", store_csv, n_store)
        out["sq_claims"], out["sq_commits"] = _store_rates(workdir / "store.db", "", store_csv, n_store)
        with emulator(workdir, time_scale=TIME_SCALE, seed=3, scenario={"latency_s": LATENCY_EMULATED_S}) as emu:
            results: dict[str, ChildResult] = {}
            for name, db in (("sqlite", str(workdir / "run.db")), ("postgres", pg.url(pg.new_database()))):
                fresh_dir(workdir / "out")
                results[name] = check(run_batchgen(run_csv, emu, workdir, rate="100000/s", concurrency=1000,
                                                   time_scale=TIME_SCALE, db=db, timeout_s=600), f"run on {name}")  # type: ignore[arg-type]
                out[f"{name}_cpu_ms"] = 1000 * results[name].cpu_s / n_run
                out[f"{name}_wall_s"] = results[name].wall_s
            fresh_dir(workdir / "out")
            db = pg.url(pg.new_database())
            started = time.perf_counter()
            procs = [_runner(run_csv, emu, workdir, db) for _ in range(2)]
            try:
                codes = [p.wait(timeout=600) for p in procs]
            finally:
                for p in procs:  # a runner that hangs must not outlive the benchmark
                    if p.poll() is None:
                        p.kill()
                        p.wait()
            out["two_wall_s"] = time.perf_counter() - started
            if any(c != 0 for c in codes):
                raise RuntimeError(f"two runners exited {codes}")
    return out


def run(workdir: Path, *, quick: bool, runs: int) -> list[Row]:
    n_store, n_run = (2000, 1000) if quick else (10_000, 5000)
    results = [one_pass(workdir / f"run{i}", n_store, n_run) for i in range(runs)]

    def col(name: str) -> list[float]:
        return [r[name] for r in results]

    def m(name: str) -> float:
        return median(col(name))

    one, two = m("postgres_wall_s"), m("two_wall_s")
    return [
        Row("6 shared store", f"claims/s, PostgreSQL (N={n_store:,}, 50 per claim)", m("pg_claims"), "req/s", "",
            None, runs=col("pg_claims"), note=f"SQLite: {m('sq_claims'):,.0f}/s"),
        Row("6 shared store", "commits/s, PostgreSQL (record_task, one each)", m("pg_commits"), "tx/s", "", None,
            runs=col("pg_commits"), note=f"SQLite: {m('sq_commits'):,.0f}/s"),
        Row("6 shared store", f"runner CPU per image, PostgreSQL (N={n_run:,})", m("postgres_cpu_ms"), "ms", "",
            None, runs=col("postgres_cpu_ms"), note=f"SQLite: {m('sqlite_cpu_ms'):.2f} ms"),
        Row("6 shared store", f"job wall time, 2 runners vs 1 (N={n_run:,}, PostgreSQL)", two, "s", "", None,
            runs=col("two_wall_s"), ratio=one / two if two else None,
            note=f"one runner: {one:.1f} s; SQLite one runner: {m('sqlite_wall_s'):.1f} s"),
    ]
