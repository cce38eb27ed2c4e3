"""`batchgen run --emulator` interrupted while tasks are in flight, then run again: the in-process emulator
died with the first run, so its tasks are resubmitted to the new one and the job still finishes with every
image on disk exactly once (rather than failing on task ids and result URLs nobody serves any more)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from batchgen.store.sqlite import Outcome, Store
from tests.run_support import check_outputs, db_of, prompts, write_job

REPO = Path(__file__).resolve().parent.parent


def start(manifest: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "batchgen", "run", str(manifest), "--emulator", "--time-scale", "0.05", "--json"]
    return subprocess.Popen(cmd, env=env, cwd=manifest.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_interrupted_emulator_run_resumes_on_a_fresh_emulator(tmp_path: Path) -> None:
    # gpt-image-1's emulated latency (tens of seconds x 0.05) keeps tasks in flight when the signal lands.
    manifest = write_job(tmp_path, [dict(r, model="gpt-image-1") for r in prompts(30)],
                         run={"rate": "50/s", "concurrency": 30})
    proc = start(manifest)
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    for line in proc.stdout:  # wait until the API holds tasks for us
        if json.loads(line).get("event") == "submitted" or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, err
    assert "Traceback" not in err
    with Store(db_of(manifest)) as store:
        open_ = [(r, a) for r, a in store.open_attempts() if a.task_id]
        assert open_, "the interrupted run left tasks in flight"
        # One of them finished on the old emulator but was not downloaded yet: its result URL is dead now.
        req, att = open_[0]
        store.record_outcomes([Outcome(att.id, req.key, "completed", result_urls=("http://127.0.0.1:9/gone.png",),
                                       credits_used=1.0)])

    again = start(manifest)
    out, err = again.communicate(timeout=90)
    assert again.returncode == 0, err[-2000:]
    events = [json.loads(line) for line in out.splitlines()]
    warnings = [e for e in events if e["event"] == "warning" and "previous run's emulator" in e["message"]]
    assert warnings, "the resumed run says why it resubmits"
    result = check_outputs(manifest)
    assert result["states"] == {"done": 30}
    assert result["images"] == 30
