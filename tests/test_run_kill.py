"""Acceptance: a real `python -m batchgen run` killed with SIGKILL at random moments, then re-run until it
finishes, ends with every image on disk exactly once and no request submitted twice (the emulator, in its
own process, keeps every task with its idempotency key). SIGTERM stops a run resumably with exit 3."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from batchgen.results.status import collect, render_text
from batchgen.store.open import open_store
from tests.emulator_fixtures import API_KEY, EmulatorProcess
from tests.run_support import check_outputs, db_of, image_files, out_of, prompts, write_job

TIME_SCALE = 0.02
REPO = Path(__file__).resolve().parent.parent


def start_run(manifest: Path, emu: EmulatorProcess) -> subprocess.Popen[bytes]:
    env = {**os.environ, "EVOLINK_API_KEY": API_KEY, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "batchgen", "run", str(manifest), "--api-base", emu.base_url, "--files-base",
           emu.base_url, "--time-scale", str(TIME_SCALE), "--json"]
    return subprocess.Popen(cmd, env=env, cwd=manifest.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[bytes], timeout_s: float = 60) -> int:
    _, err = proc.communicate(timeout=timeout_s)
    assert b"Traceback" not in err, err.decode()[-3000:]
    return proc.returncode


def wait_for_images(manifest: Path, proc: subprocess.Popen[bytes], count: int) -> None:
    """Until the run has saved `count` images or ended (a busy machine can take over a second just to start
    Python)."""
    for _ in range(600):
        if len(image_files(out_of(manifest))) >= count or proc.poll() is not None:
            return
        time.sleep(0.05)


def test_sigkill_at_random_moments_then_resume(tmp_path: Path,
                                               emulator_process: Callable[..., EmulatorProcess]) -> None:
    emu = emulator_process(time_scale=TIME_SCALE)
    rows = prompts(120) + [{"id": f"m{i}", "prompt": f"pair {i}", "n": 2} for i in range(20)]
    manifest = write_job(tmp_path, rows, run={"rate": "25/s", "concurrency": 30})
    rng = random.Random(5)
    kills = 0
    for _ in range(4):
        proc = start_run(manifest, emu)
        time.sleep(rng.uniform(0.7, 1.6))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()
    assert kills >= 2
    codes = [finish(start_run(manifest, emu))]
    while codes[-1] == 3 and len(codes) < 4:
        codes.append(finish(start_run(manifest, emu)))
    assert codes[-1] == 0, codes
    result = check_outputs(manifest)
    assert result["states"] == {"done": 140}
    assert result["images"] == 120 + 40
    tasks = emu.tasks()
    # One task per request: a resumed run polled the tasks it had and resent unanswered submits with the
    # same key (the emulator replays those instead of creating a second task).
    per_request = Counter(t["idempotency_key"].rsplit("-a", 1)[0] for t in tasks)
    assert len(per_request) == 140 and max(per_request.values()) == 1, per_request.most_common(3)
    assert all(t["idempotency_key"].endswith("-a1") for t in tasks)


def test_sigterm_stops_resumably_then_finishes(tmp_path: Path,
                                               emulator_process: Callable[..., EmulatorProcess]) -> None:
    emu = emulator_process(time_scale=TIME_SCALE)
    manifest = write_job(tmp_path, prompts(150), run={"rate": "40/s", "concurrency": 20})
    proc = start_run(manifest, emu)
    wait_for_images(manifest, proc, 3)  # under way: a few images on disk, many requests still to go
    assert proc.poll() is None
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert finish(proc, timeout_s=15) == 3
    assert time.monotonic() - sent < 10  # "within a few seconds" (generous bound for slow CI)
    done_before = check_outputs(manifest)["states"].get("done", 0)
    assert 0 < done_before < 150
    assert finish(start_run(manifest, emu)) == 0
    assert check_outputs(manifest)["states"] == {"done": 150}
    per_request = Counter(t["idempotency_key"].rsplit("-a", 1)[0] for t in emu.tasks())
    assert max(per_request.values()) == 1


def test_images_the_machine_took_back_are_downloaded_again_after_a_kill(
        tmp_path: Path, emulator_process: Callable[..., EmulatorProcess]) -> None:
    """What a power cut leaves: the store's commits naming images whose bytes never left the page cache (an
    SQLite job's images are not fsynced one by one: docs/run-engine.md, Durability). Made here with a real
    SIGKILL, then the files of images that run recorded emptied or removed: the next run finds them, downloads
    them again from their tasks' results, submits nothing again, and ends with every image whole."""
    emu = emulator_process(time_scale=TIME_SCALE)
    manifest = write_job(tmp_path, prompts(150), run={"rate": "40/s", "concurrency": 20})
    proc = start_run(manifest, emu)
    wait_for_images(manifest, proc, 30)
    sqlite_job = isinstance(db_of(manifest), Path)
    if sqlite_job:  # status tells a run still going from one that was killed (its lock file names it)
        running = collect(db_of(manifest))["last_run"]
        assert running["running"] is True and running["pid"] == proc.pid
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.stderr is not None
    proc.stderr.close()
    if sqlite_job:
        killed = collect(db_of(manifest))
        assert killed["last_run"]["running"] is False
        assert "did not finish: stopped without recording its end (killed?)" in render_text(killed)
    saved = image_files(out_of(manifest))
    assert len(saved) >= 30, "the run was killed before it saved enough images"
    saved[0].write_bytes(b"")  # a new file whose data never reached the disk
    saved[1].unlink()  # a rename that never reached it
    tasks_before = len(emu.tasks())
    env = {**os.environ, "EVOLINK_API_KEY": API_KEY, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "batchgen", "run", str(manifest), "--api-base", emu.base_url, "--files-base",
           emu.base_url, "--time-scale", str(TIME_SCALE), "--json"]
    result = subprocess.run(cmd, env=env, cwd=manifest.parent, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 images it recorded are not on disk whole" in result.stdout
    assert check_outputs(manifest)["states"] == {"done": 150}
    with open_store(db_of(manifest)) as store:  # every image whole: its bytes hash to what was recorded
        images = [img for rec in store.iter_requests() for img in rec.images]
    assert len(images) == 150 and all(
        hashlib.sha256((out_of(manifest) / img.path).read_bytes()).hexdigest() == img.sha256 for img in images)
    assert saved[0].stat().st_size > 0 and saved[1].exists()
    per_request = Counter(t["idempotency_key"].rsplit("-a", 1)[0] for t in emu.tasks())
    assert max(per_request.values()) == 1 and len(emu.tasks()) <= 150  # nothing generated twice
    assert len(emu.tasks()) >= tasks_before
