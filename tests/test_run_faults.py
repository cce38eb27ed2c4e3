"""Acceptance: several hundred requests through a storm of injected faults — 429 bursts, 500/503, dropped
connections (before and after the task is created), every task error code, slow and stalled tasks. Every
request ends done with its images on disk, or failed with the code the retry table gives; requests whose
fault clears after a few attempts succeed; nothing is paid twice for the same attempt."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from batchgen.errors import TASK_RULES, Action
from batchgen.store.sqlite import Store
from tests.emulator_fixtures import EmulatorFactory
from tests.run_support import check_outputs, db_of, prompts, run, write_job

RETRYABLE = [code for code, rule in TASK_RULES.items() if rule.action is Action.RETRY]
FINAL = [code for code, rule in TASK_RULES.items() if rule.action is Action.FAIL]


async def test_mixed_faults_end_done_or_failed_with_the_right_code(tmp_path: Path,
                                                                   emulator_factory: EmulatorFactory) -> None:
    http = {"http_429": 0.04, "http_500": 0.02, "http_503": 0.02, "drop": 0.01, "drop_after": 0.02}
    faults = {
        "submit": http,
        "poll": {k: v for k, v in http.items() if k != "drop_after"},
        "tasks": {"errors": {code: 0.004 for code in TASK_RULES}, "stalled": 0.01, "slow": 0.05},
        "retry_after_s": 20,
    }
    # Deterministic: these prompts fail with a retryable code for their first two attempts, then succeed;
    # these fail for good.
    rules = [{"prompt": f"^flaky-{code} ", "fail_with": code, "times": 2} for code in RETRYABLE]
    rules += [{"prompt": f"^final-{code} ", "fail_with": code} for code in FINAL]
    rules += [{"prompt": "^http500 ", "fail_with": 500, "times": 2}, {"prompt": "^http503 ", "fail_with": 503,
                                                                      "times": 1}]
    emu = await emulator_factory(faults=faults, rules=rules, seed=7)
    rows = prompts(300)
    rows += [{"id": f"flaky-{c}", "prompt": f"flaky-{c} case"} for c in RETRYABLE]
    rows += [{"id": f"final-{c}", "prompt": f"final-{c} case"} for c in FINAL]
    rows += [{"id": "h500", "prompt": "http500 case"}, {"id": "h503", "prompt": "http503 case"}]
    # Five attempts: the flaky prompts fail twice by rule, and random faults (about 7% an attempt) must not
    # be able to use up the rest by chance (with four attempts that happened in about 3% of runs).
    manifest = write_job(tmp_path, rows, run={"max_attempts": 5, "max_wait": "60s", "concurrency": 60,
                                              "rate": "300/s"})
    codes = []
    for _ in range(6):  # stalled tasks are left after max_wait (exit 3) and retried by a later run
        codes.append(await run(manifest, emu.base_url))
        if codes[-1] != 3:
            break
    assert codes[-1] in (0, 1), codes
    result = check_outputs(manifest)
    assert set(result["states"]) <= {"done", "failed"}
    with Store(db_of(manifest)) as store:
        by_id = {rec.item_id: rec for rec in store.iter_requests()}
    for code in RETRYABLE:
        rec = by_id[f"flaky-{code}"]
        assert rec.state == "done", (code, rec.error_code)
    for code in FINAL:
        rec = by_id[f"final-{code}"]
        assert rec.state == "failed" and rec.error_code == code and len(rec.attempt_rows) == 1
    assert by_id["h500"].state == "done" and by_id["h503"].state == "done"
    for rec in by_id.values():
        if rec.state == "failed":
            last = rec.attempt_rows[-1]
            assert rec.error_code == last.error_code, rec.key
            rule = TASK_RULES.get(rec.error_code or "")
            if rule is not None and rule.action is Action.RETRY:
                assert rec.attempts == 5  # gave up only after max_attempts
        # Each attempt reached the server at most once as a new task (resends carry the same key).
    tasks = emu.tasks()
    per_key = Counter(t["idempotency_key"] for t in tasks)
    assert max(per_key.values()) == 1
    assert emu.stats()["idempotent_replays"] >= 1  # drop_after: the lost answer was recovered by key
