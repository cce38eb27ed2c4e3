"""Acceptance (issue 13): three `batchgen run` processes share one job through PostgreSQL while one of them
is SIGKILLed at random moments and restarted, until the job is done. Every image is on disk exactly once,
no task is created twice (the emulator keeps every task with its idempotency key), and the emulator's
busiest second stays within the key's rate plus its burst: the runners share one budget."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from tests.emulator_fixtures import API_KEY, EmulatorProcess
from tests.run_support import check_outputs, prompts, write_job

TIME_SCALE = 0.05  # runner lease: max(1.5 s, 15 s x 0.05) = 1.5 s
RATE = 25
REPO = Path(__file__).resolve().parent.parent


def start_runner(manifest: Path, emu: EmulatorProcess, db_url: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "EVOLINK_API_KEY": API_KEY, "PYTHONPATH": str(REPO), "BATCHGEN_DB_URL": db_url}
    cmd = [sys.executable, "-m", "batchgen", "run", str(manifest), "--api-base", emu.base_url, "--files-base",
           emu.base_url, "--time-scale", str(TIME_SCALE), "--json"]
    with log.open("ab") as out:  # JSON events and any message, of every process that ran in this slot
        return subprocess.Popen(cmd, env=env, cwd=manifest.parent, stdout=out, stderr=subprocess.STDOUT)


def in_flight_of(db_url: str, pid: int) -> int:
    """Requests in flight held by the live runner with this pid (0 before it registered)."""
    import psycopg

    with psycopg.connect(db_url) as conn:
        if conn.execute("SELECT to_regclass('runners')").fetchone() in (None, (None,)):
            return 0  # no runner has migrated the database yet
        row = conn.execute("SELECT COUNT(*) FROM requests q JOIN runners r ON q.claimed_by = r.id WHERE r.pid = %s "
                           "AND r.stopped_at IS NULL AND q.state IN ('submitted', 'completed')", (pid,)).fetchone()
    return int(row[0]) if row else 0


def test_three_runners_one_killed_repeatedly(tmp_path: Path, pg_url: str,
                                             emulator_process: Callable[..., EmulatorProcess]) -> None:
    from tests import run_support

    emu = emulator_process(time_scale=TIME_SCALE)
    rows = prompts(260) + [{"id": f"m{i}", "prompt": f"pair {i}", "n": 2} for i in range(40)]
    manifest = write_job(tmp_path, rows, run={"rate": f"{RATE}/s", "concurrency": 15})
    logs = [tmp_path / f"runner{i}.log" for i in range(3)]
    runners = [start_runner(manifest, emu, pg_url, log) for log in logs]
    rng = random.Random(13)
    kills = orphaned = 0
    for _ in range(4):
        time.sleep(rng.uniform(0.5, 1.5))
        victim = runners[0]
        # A random moment, preferably one at which it holds tasks in flight (up to 2 s more).
        deadline = time.monotonic() + 2.0
        while (held := in_flight_of(pg_url, victim.pid)) == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        if victim.poll() is None:
            victim.send_signal(signal.SIGKILL)
            kills += 1
            orphaned += held > 0
        victim.wait(timeout=10)
        time.sleep(rng.uniform(0.0, 1.0))
        runners[0] = start_runner(manifest, emu, pg_url, logs[0])
    codes = [p.wait(timeout=90) for p in runners]
    for _ in range(3):  # the job may still hold work a killed runner left: one more runner finishes it
        if codes[-1] == 0 and all(c == 0 for c in codes):
            break
        codes = [start_runner(manifest, emu, pg_url, logs[0]).wait(timeout=60)]
    assert kills >= 2 and orphaned >= 1  # at least once it died holding tasks: someone had to take them over
    assert codes[-1] == 0, (codes, logs[0].read_text()[-2000:])
    text = "".join(log.read_text() for log in logs)
    assert "Traceback" not in text, text[-3000:]
    assert '"event":"runners"' in text and "sharing job job with 2 other runners" in text
    # Taken over by a survivor's takeover hook (counted here) or by a restarted runner at its start.
    takeovers = text.count('"event":"takeover"')

    run_support.DB_URL = pg_url
    try:
        result = check_outputs(manifest)  # every image recorded is on disk exactly once, and nothing else
    finally:
        run_support.DB_URL = None
    assert result["states"] == {"done": 300}
    assert result["images"] == 260 + 80
    tasks = emu.tasks()
    per_request = Counter(t["idempotency_key"].rsplit("-a", 1)[0] for t in tasks)
    assert len(per_request) == 300 and max(per_request.values()) == 1, per_request.most_common(3)
    stats = emu.stats()
    assert stats["max_requests_in_1s"] <= RATE + RATE, stats  # the key's rate plus its one-second burst
    print(f"\nkills={kills} takeovers={takeovers} replays={stats.get('idempotent_replays')} "
          f"busiest second={stats['max_requests_in_1s']}")
