"""Scenario 5 — resume: how soon a million-request job with 1,000 left sends its first request.

The nightly-catalogue case: a store of 1,000,000 requests, 999,000 of them done, and the same command
run again. Everything between process start and the first submission is overhead the user waits for:
interpreter start-up, reading the manifest's settings, the fingerprint check that skips re-expanding an
unchanged manifest, the store's counts and credit totals, the credit check, rebuilding the scheduler's
state. Target: the first submission within 1 second of the process starting.

Set-up (once per invocation, not timed): a 1,000,000-row CSV (`--quick`: 100,000) is expanded into a store
by the store's own `sync`; then a raw sqlite3 connection (set-up only) marks all but the last 1,000
requests done the way a finished run leaves them: `requests.state = 'done'`, one `completed` attempt row
with its task id, credits and result URL, and one `images` row each. Each measured run starts from a copy
of that store (so every run resumes the same state), against an emulator with no rate limit and 50 ms
tasks, and runs to the end.

The figure: the emulator's `created` time of the earliest task minus the wall-clock time just before the
runner was forked (both `time.time()` on the same machine). The runner's own `submitted` JSON event is
reported next to it (it is written when the API's answer has arrived, so it is a little later).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
import time
from pathlib import Path

from benchmarks.bench_scale import EXPAND
from benchmarks.harness import Row, check, emulator, fresh_dir, median, run_batchgen, run_child, write_csv

LEFT = 1000
TARGET_S = 1.0
TIME_SCALE = 0.001


def build_store(workdir: Path, rows: int) -> tuple[Path, Path]:
    """The CSV and a store of `rows` requests with all but the last LEFT marked done (set-up, untimed)."""
    fresh_dir(workdir)
    csv_path = write_csv(workdir / "resume.csv", rows, tag="resume")
    db = workdir / "resume-base.db"
    result = check(run_child([sys.executable, "-c", EXPAND, str(csv_path), str(db)], timeout_s=1800,
                             workdir=workdir), "expansion")
    if json.loads(result.stdout.strip().splitlines()[-1])["added"] != rows:
        raise RuntimeError("the store does not hold every row")
    now, done = time.time(), rows - LEFT
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN")
        conn.execute("UPDATE requests SET state='done', attempts=1, attempt_no=1, updated_at=? WHERE rowid <= ?",
                     (now, done))
        conn.execute(
            "INSERT INTO attempts (request_key, attempt_no, idempotency_key, model, state, submit_tries, task_id, "
            "submitted_at, finished_at, credits_estimated, credits_reserved, credits_used, result_urls) "
            "SELECT key, 1, 'bg1-' || key || '-a1', model, 'completed', 1, 'task-unified-0-' || rowid, ?, ?, "
            "est_credits, est_credits, est_credits, '[\"http://127.0.0.1/r/' || rowid || '_0.png\"]' "
            "FROM requests WHERE rowid <= ? ORDER BY rowid", (now, now, done))
        conn.execute(
            "INSERT INTO images (request_key, idx, path, url, bytes, sha256, width, height, format, attempt_id, "
            "created_at) SELECT key, 1, item_id || '.png', 'http://127.0.0.1/r/' || rowid || '_0.png', 1500, "
            "lower(hex(randomblob(32))), 64, 64, 'PNG', rowid, ? FROM requests WHERE rowid <= ? ORDER BY rowid",
            (now, done))
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return csv_path, db


def one_run(workdir: Path, csv_path: Path, base_db: Path, index: int) -> dict[str, float]:
    db = workdir / f"resume-{index}.db"
    shutil.copyfile(base_db, db)
    shutil.rmtree(workdir / "out", ignore_errors=True)
    with emulator(workdir, time_scale=TIME_SCALE, seed=5, scenario={"latency_s": 50.0}) as emu:
        result = check(run_batchgen(csv_path, emu, workdir, rate="10000/s", concurrency=200,
                                    time_scale=TIME_SCALE, db=db, timeout_s=300), "batchgen run (resume)")
        tasks = emu.tasks()
    for suffix in ("", "-wal", "-shm", ".lock"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    if len(tasks) != LEFT:
        raise RuntimeError(f"the resumed run submitted {len(tasks)} tasks, expected {LEFT}")
    first_task = min(float(t["created"]) for t in tasks)
    submitted = [float(e["t"]) for e in result.events() if e.get("event") == "submitted"]
    return {"first_s": first_task - result.started_wall,
            "event_s": (min(submitted) - result.started_wall) if submitted else float("nan"),
            "wall_s": result.wall_s, "rss_mb": result.max_rss_mb}


def run(workdir: Path, *, quick: bool, runs: int) -> list[Row]:
    rows = 100_000 if quick else 1_000_000
    csv_path, base_db = build_store(workdir, rows)
    results = [one_run(workdir, csv_path, base_db, i) for i in range(runs)]

    def col(name: str) -> list[float]:
        return [r[name] for r in results]

    first = median(col("first_s"))
    return [
        Row("5 resume", f"start to first submission, {rows:,} rows, {LEFT:,} left", first, "s",
            f"<= {TARGET_S:g} s", first <= TARGET_S, bound=f"{TARGET_S:g} s", ratio=first / TARGET_S,
            runs=col("first_s"), note=f"first 'submitted' event {median(col('event_s')):.2f} s; whole run "
                                      f"{median(col('wall_s')):.1f} s, peak {median(col('rss_mb')):.0f} MB"),
    ]
