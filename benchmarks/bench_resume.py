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

Also reported: when all 1,000 images are on disk (the emulator's download counter), and how long the run
keeps going after that. At the end of every run batchgen writes the provenance index and `results.csv`
of the *whole job*; for a million requests that takes more than five minutes, so the benchmark waits
30 s after the last image and then stops the run (SIGKILL; the store is already complete by then) rather
than spend a quarter of an hour per pass on it.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.bench_scale import EXPAND
from benchmarks.harness import REPO, Row, batchgen_cmd, check, emulator, fresh_dir, median, run_child, write_csv

LEFT = 1000
TARGET_S = 1.0
TIME_SCALE = 0.001
DONE_TIMEOUT_S = 300.0  # the 1,000 images take a few seconds
EXIT_WAIT_S = 30.0  # then give the run this long to exit before stopping it (see the docstring)


def build_store(workdir: Path, rows: int) -> tuple[Path, Path]:
    """The CSV and a store of `rows` requests with all but the last LEFT marked done (set-up, untimed)."""
    fresh_dir(workdir)
    csv_path = write_csv(workdir / "resume.csv", rows, tag="resume")
    db = workdir / "resume-base.db"
    # The output folder the measured runs use is recorded, as a real run would have: a job's images stay
    # where its store says they are (a run pointed elsewhere is refused).
    result = check(run_child([sys.executable, "-c", EXPAND, str(csv_path), str(db), str(workdir / "out")],
                             timeout_s=1800, workdir=workdir), "expansion")
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
    """One resumed run: time to the first submission, time until the 1,000 images are on disk, and how long
    the run then keeps going (the end-of-run export of the whole job) before it exits or we stop it."""
    db = workdir / f"resume-{index}.db"
    shutil.copyfile(base_db, db)
    shutil.rmtree(workdir / "out", ignore_errors=True)
    out_path = workdir / f"resume-{index}.out"
    with emulator(workdir, time_scale=TIME_SCALE, seed=5, scenario={"latency_s": 50.0}) as emu:
        cmd = batchgen_cmd("run", str(csv_path), "--db", str(db), "--out", str(workdir / "out"), "--time-scale",
                           repr(TIME_SCALE), "--json", "--rate", "10000/s", "--concurrency", "200")
        with out_path.open("w") as out:
            started_wall, started = time.time(), time.monotonic()
            process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL, env=emu.env(), cwd=REPO)
            try:
                done_s = after_s = float("nan")
                while time.monotonic() - started < DONE_TIMEOUT_S and process.poll() is None:
                    if emu.stats()["downloads"] >= LEFT:
                        done_s = time.monotonic() - started
                        break
                    time.sleep(0.1)
                try:
                    process.wait(timeout=EXIT_WAIT_S)
                    after_s = time.monotonic() - started - done_s
                    stopped = 0.0
                except subprocess.TimeoutExpired:
                    after_s, stopped = time.monotonic() - started - done_s, 1.0
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        tasks = emu.tasks()
    events = [json.loads(line) for line in out_path.read_text().splitlines() if line.startswith("{")]
    for suffix in ("", "-wal", "-shm", ".lock"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    if len(tasks) != LEFT:
        raise RuntimeError(f"the resumed run submitted {len(tasks)} tasks, expected {LEFT}")
    first_task = min(float(t["created"]) for t in tasks)
    submitted = [float(e["t"]) for e in events if e.get("event") == "submitted"]
    return {"first_s": first_task - started_wall,
            "event_s": (min(submitted) - started_wall) if submitted else float("nan"),
            "done_s": done_s, "after_s": after_s, "stopped": stopped}


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
            runs=col("first_s"), note=f"first 'submitted' event {median(col('event_s')):.2f} s"),
        Row("5 resume", f"start to all {LEFT:,} images on disk", median(col("done_s")), "s", "", None,
            runs=col("done_s"), note=(f"then the end-of-run export ran {median(col('after_s')):.0f} s more"
                                      + (" and was still running when stopped" if max(col("stopped")) else ""))),
    ]
