"""Acceptance for several API keys in one run (issue 15), against the emulator with one account per key:
each key within its own limit, a key revoked and a key out of credits mid-run with nothing paid twice, a
SIGKILL and resume in which every task is polled with its own key, a photo uploaded once per key, and no
key anywhere in the database, events, exports or the report."""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from batchgen.cli import main
from batchgen.emulator import Emulator
from batchgen.engine.keyfile import fingerprint
from batchgen.engine.ratelimit import AdaptiveLimiter
from batchgen.results.report import write_report
from batchgen.results.status import collect
from batchgen.store.sqlite import Store
from batchgen.units import parse_rate
from tests.emulator_fixtures import EmulatorFactory, EmulatorProcess
from tests.run_support import check_outputs, db_of, json_events, out_of, prompts, run, write_job

KEYS = ["sk-evo-pool-key-alpha-0001", "sk-evo-pool-key-bravo-0002", "sk-evo-pool-key-charlie-0003"]
FINAL = ("completed", "failed", "cancelled")
REPO = Path(__file__).resolve().parent.parent
_REQUEST_KEY = re.compile(r"(v1-[0-9a-f]{32})-a\d+$")


def acct(key: str) -> str:
    """The emulator's account id of a key: "u" + the same 12 hex digits batchgen's fingerprint uses."""
    return "u" + hashlib.sha256(key.encode()).hexdigest()[:12]


def keys_file(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "keys.txt"
    path.write_text("# the pool\n" + "\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def tasks_per_request(tasks: list[dict[str, Any]]) -> Counter[str]:
    """Emulator tasks per request key (whatever key or attempt sent them)."""
    found = [_REQUEST_KEY.search(t["idempotency_key"] or "") for t in tasks]
    assert all(found), "every task carries batchgen's idempotency key"
    return Counter(m.group(1) for m in found if m)


def attempts(manifest: Path) -> list[Any]:
    with Store(db_of(manifest)) as store:
        return [a for r in store.iter_requests() for a in r.attempt_rows]


async def test_three_keys_with_different_limits_each_keep_to_their_own(
        tmp_path: Path, emulator_factory: EmulatorFactory) -> None:
    rates = [4, 8, 12]
    # Each account's limit a little above the key's configured rate, as a user would set it: no 429s to
    # blur the split, and the bound below is the stricter one (the key's own rate plus its burst).
    emu = await emulator_factory(accounts=[{"api_key": k, "rate_limit": r * 1.25}
                                           for k, r in zip(KEYS, rates, strict=True)])
    path = keys_file(tmp_path, [f"{k} label=key{i} rate={r}/s" for i, (k, r) in enumerate(zip(KEYS, rates,
                                                                                             strict=True))])
    manifest = write_job(tmp_path, prompts(96), run={"rate": "50/s", "concurrency": 30})
    assert await run(manifest, emu.base_url, keys_file=path) == 0
    assert check_outputs(manifest)["states"] == {"done": 96}
    stats = emu.stats()
    per_account = stats["accounts"]
    for key, rate in zip(KEYS, rates, strict=True):
        # Each key's own controller: never more than its limit plus its burst in any one second.
        burst = AdaptiveLimiter(parse_rate(rate)).burst
        assert per_account[acct(key)]["max_requests_in_1s"] <= math.ceil(rate + burst), (rate, per_account[acct(key)])
    created = [per_account[acct(k)]["tasks_created"] for k in KEYS]
    assert sum(created) == 96 and created[0] < created[1] < created[2], created  # work follows the rates
    assert all(per_account[acct(k)]["rate_limited"] == 0 for k in KEYS)
    assert max(tasks_per_request(emu.tasks()).values()) == 1
    # Every attempt names its key by fingerprint, and the emulator agrees about whose task it is.
    account_of = {t["id"]: t["account"] for t in emu.tasks()}
    assert all(account_of[a.task_id] == "u" + a.key_fp for a in attempts(manifest))


async def test_a_key_revoked_and_a_key_out_of_credits_mid_run(
        tmp_path: Path, emulator_factory: EmulatorFactory, capsys: pytest.CaptureFixture[str]) -> None:
    emu = await emulator_factory(latency_s=4.0, accounts=[{"api_key": k, "rate_limit": 15} for k in KEYS])
    path = keys_file(tmp_path, [f"{KEYS[0]} label=alpha", f"{KEYS[1]} label=bravo", KEYS[2]])
    manifest = write_job(tmp_path, prompts(90), run={"rate": "15/s", "concurrency": 24})
    open_at_revoke: set[str] = set()
    bravo_open: set[str] = set()

    async def mid_run() -> None:
        # Revoke alpha, and empty bravo's balance, each while it has tasks in flight.
        while not (open_at_revoke and bravo_open):
            tasks = emu.tasks()
            for key, seen in ((KEYS[0], open_at_revoke), (KEYS[1], bravo_open)):
                mine = [t for t in tasks if t["account"] == acct(key)]
                running = {t["id"] for t in mine if t["status"] not in FINAL}
                if not seen and len(mine) >= 6 and running:
                    seen.update(running)
                    if key == KEYS[0]:
                        emu.revoke(key)
                    else:
                        emu.set_credits(key, 0.0)
            await asyncio.sleep(0.002)

    watcher = asyncio.ensure_future(mid_run())
    code = await run(manifest, emu.base_url, keys_file=path)
    watcher.cancel()
    out = capsys.readouterr()
    events = json_events(out.out)
    assert open_at_revoke and bravo_open
    # alpha's tasks in flight cannot be polled any more: left open, and that alone makes it exit 3.
    summary = events[-1]
    assert code == 3 and summary["reason"] == "key_missing", summary
    failed = {e["key"]: e["state"] for e in events if e["event"] == "key_failed"}
    assert failed == {"alpha": "revoked", "bravo": "out_of_credits"}
    with Store(db_of(manifest)) as store:
        counts = store.counts()
        left = {a.task_id: a.key_fp for r in store.iter_requests(["submitted"]) for a in r.attempt_rows[-1:]}
    assert counts["done"] + counts["submitted"] == 90 and counts["failed"] == 0
    assert open_at_revoke <= set(left) and set(left.values()) == {fingerprint(KEYS[0])}
    # bravo's tasks in flight at its 402 were still polled with bravo and finished.
    account_of = {t["id"]: t for t in emu.tasks()}
    done_tasks = {a.task_id for a in attempts(manifest) if a.state == "completed"}
    assert bravo_open <= done_tasks
    assert all(account_of[t]["account"] == acct(KEYS[1]) for t in bravo_open)
    # Nothing paid twice: every request has at most one task, whichever keys it was offered to.
    assert max(tasks_per_request(emu.tasks()).values()) == 1
    status = {k["key"]: k for k in collect(db_of(manifest))["keys"]}
    assert status["alpha"]["state"] == "revoked" and status["bravo"]["state"] == "out_of_credits"
    assert status[fingerprint(KEYS[2])]["state"] == "active"
    assert sum(k["requests"] for k in status.values()) == len(attempts(manifest))
    assert status["alpha"]["in_flight"] == len(left)

    # No key anywhere: database (and its WAL), events, stderr, export, provenance, report.
    report, _ = write_report(db_of(manifest))
    places = [db_of(manifest), Path(str(db_of(manifest)) + "-wal"), report,
              *[p for p in out_of(manifest).rglob("*") if p.is_file()]]
    blobs = [p.read_bytes() for p in places if p.exists()] + [out.out.encode(), out.err.encode()]
    assert any(b"alpha" in b for b in blobs)  # the labels are there, the keys are not
    for key in KEYS:
        assert not any(key.encode() in blob for blob in blobs), key[-4:]


async def test_a_photo_used_with_two_keys_is_uploaded_once_per_key(
        tmp_path: Path, emulator_factory: EmulatorFactory) -> None:
    emu: Emulator = await emulator_factory()
    Image.new("RGB", (48, 32), "red").save(tmp_path / "a.png")
    digest = hashlib.sha256((tmp_path / "a.png").read_bytes()).hexdigest()
    rows = [{"id": f"p{i:02d}", "prompt": f"product on marble {i}", "image_urls": "a.png"} for i in range(40)]
    manifest = write_job(tmp_path, rows, run={"rate": "40/s", "concurrency": 20})
    assert await run(manifest, emu.base_url, api_keys=",".join(KEYS[:2])) == 0
    assert check_outputs(manifest)["states"] == {"done": 40}
    stats = emu.stats()
    assert stats["uploads_by_sha256"] == {digest: 2} and stats["cross_account_references"] == 0
    with Store(db_of(manifest)) as store:
        uploads = {u.file_url: u.key_fp for u in store.uploads.live()}
    assert sorted(uploads.values()) == sorted(fingerprint(k) for k in KEYS[:2])
    for a in attempts(manifest):
        assert a.body is not None and uploads[a.body["image_urls"][0]] == a.key_fp  # its own key's file


def test_sigkill_and_resume_polls_every_task_with_its_own_key(
        tmp_path: Path, emulator_process: Callable[..., EmulatorProcess]) -> None:
    scenario = tmp_path / "accounts.yaml"
    scenario.write_text(yaml.safe_dump({"latency_s": 20.0,
                                        "accounts": [{"api_key": k, "rate_limit": 20} for k in KEYS]}))
    emu = emulator_process(time_scale=0.02, scenario=scenario)
    manifest = write_job(tmp_path, prompts(120), run={"rate": "12/s", "concurrency": 40})
    env = {**os.environ, "EVOLINK_API_KEYS": ",".join(KEYS), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "batchgen", "run", str(manifest), "--api-base", emu.base_url, "--files-base",
           emu.base_url, "--time-scale", "0.02", "--json"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while len(emu.tasks()) < 40 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.stderr is not None
    proc.stderr.close()
    with Store(db_of(manifest)) as store:
        open_before = len(store.open_attempts())
    assert open_before > 0
    result = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, timeout=90)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert b"Traceback" not in result.stderr
    assert check_outputs(manifest)["states"] == {"done": 120}
    stats = emu.stats()
    # Had any task been polled with another key, the emulator would have said "not found".
    assert stats["tasks_not_found"] == 0
    tasks = emu.tasks()
    assert max(tasks_per_request(tasks).values()) == 1 and len(tasks) == 120
    account_of = {t["id"]: t["account"] for t in tasks}
    assert all(account_of[a.task_id] == "u" + a.key_fp for a in attempts(manifest))
    assert {a.key_fp for a in attempts(manifest)} == {fingerprint(k) for k in KEYS}
    for key in KEYS:
        assert key.encode() not in result.stdout + result.stderr


async def test_a_resumed_run_without_the_key_leaves_its_tasks(
        tmp_path: Path, emulator_factory: EmulatorFactory, capsys: pytest.CaptureFixture[str]) -> None:
    emu = await emulator_factory(latency_s=3600.0)  # nothing finishes until the clock is moved on
    manifest = write_job(tmp_path, prompts(30), run={"rate": "100/s", "concurrency": 30})
    # A first run with two keys stops at its runtime limit with every task in flight.
    assert await run(manifest, emu.base_url, api_keys=",".join(KEYS[:2]), max_runtime_s=1.0) == 3
    with Store(db_of(manifest)) as store:
        open_keys = Counter(a.key_fp for _, a in store.open_attempts())
    assert set(open_keys) == {fingerprint(KEYS[0]), fingerprint(KEYS[1])} and sum(open_keys.values()) == 30
    emu.advance(3600)
    capsys.readouterr()
    # Resumed with only the first key: the second key's tasks are named and left as they are.
    code = await run(manifest, emu.base_url, api_keys=KEYS[0])
    out = capsys.readouterr().out
    events = json_events(out)
    assert code == 3 and events[-1]["reason"] == "key_missing", events[-1]
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert any(fingerprint(KEYS[1]) in w and "left for a run" in w for w in warnings), warnings
    with Store(db_of(manifest)) as store:
        assert Counter(a.key_fp for _, a in store.open_attempts()) == {fingerprint(KEYS[1]): open_keys[
            fingerprint(KEYS[1])]}
    assert emu.stats()["tasks_not_found"] == 0  # it did not even try to look at them
    # With the key back, they are polled and finish; nothing was submitted twice.
    assert await run(manifest, emu.base_url, api_keys=",".join(KEYS[:2])) == 0
    assert check_outputs(manifest)["states"] == {"done": 30}
    assert max(tasks_per_request(emu.tasks()).values()) == 1 and len(emu.tasks()) == 30
    assert KEYS[1] not in out


async def test_the_credit_cap_counts_a_revoked_keys_tasks_in_flight(
        tmp_path: Path, emulator_factory: EmulatorFactory, capsys: pytest.CaptureFixture[str]) -> None:
    # The third key is revoked after its 10th task, with those tasks still running: the account still
    # finishes and charges them, so the cap must go on counting them after the key leaves the pool.
    emu = await emulator_factory(latency_s=20.0, accounts=[
        {"api_key": KEYS[0], "rate_limit": 20}, {"api_key": KEYS[1], "rate_limit": 20},
        {"api_key": KEYS[2], "rate_limit": 20, "revoke_after_submits": 10}])
    manifest = write_job(tmp_path, prompts(120), run={"rate": "20/s", "concurrency": 60})
    cap = 50.0
    code = await run(manifest, emu.base_url, api_keys=",".join(KEYS), max_credits=cap)
    events = json_events(capsys.readouterr().out)
    assert code == 3
    assert {e["key"]: e["state"] for e in events if e["event"] == "key_failed"} == {
        fingerprint(KEYS[2]): "revoked"}
    emu.advance(3600)  # the revoked key's tasks finish on the account, and are charged there
    charged = emu.stats()["credits_charged"]
    assert charged <= cap + 1e-9, charged
    assert collect(db_of(manifest))["credits"]["spent"] <= cap + 1e-9


async def test_a_revoked_keys_tasks_are_given_up_only_when_asked_and_then_finish_with_other_keys(
        tmp_path: Path, emulator_factory: EmulatorFactory, capsys: pytest.CaptureFixture[str]) -> None:
    emu = await emulator_factory(latency_s=20.0, accounts=[
        {"api_key": KEYS[0], "rate_limit": 20}, {"api_key": KEYS[1], "rate_limit": 20},
        {"api_key": KEYS[2], "rate_limit": 20, "revoke_after_submits": 8}])
    path = keys_file(tmp_path, [f"{KEYS[0]} label=alpha", f"{KEYS[1]} label=bravo", f"{KEYS[2]} label=charlie"])
    manifest = write_job(tmp_path, prompts(60), run={"rate": "20/s", "concurrency": 40})
    assert await run(manifest, emu.base_url, keys_file=path) == 3
    capsys.readouterr()
    # Without the revoked key the run can only leave its tasks, every time, and says how to give them up.
    code = await run(manifest, emu.base_url, api_keys=",".join(KEYS[:2]))
    summary = json_events(capsys.readouterr().out)[-1]
    assert code == 3 and summary["reason"] == "key_missing", summary
    charlie = fingerprint(KEYS[2])
    assert f"batchgen retry --abandon-tasks-of-key {charlie}" in summary["message"]
    with Store(db_of(manifest)) as store:
        stuck = {a.id: a.task_id for _, a in store.open_attempts() if a.key_fp == charlie}
        spent_before = store.credit_totals().spent
    assert len(stuck) == 8 and all(stuck.values())
    # A plain retry does not touch them; a name that is no key of the job changes nothing.
    cli = CliRunner()
    assert "requeued 0 failed requests" in cli.invoke(main, ["retry", str(manifest)]).output
    wrong = cli.invoke(main, ["retry", str(manifest), "--abandon-tasks-of-key", "delta"])
    assert wrong.exit_code == 2 and "'delta' is no key of this job" in wrong.output and "charlie" in wrong.output
    with Store(db_of(manifest)) as running:  # a run holds the job (it might be polling them): not now
        running.runners.lock()
        held = cli.invoke(main, ["retry", str(manifest), "--abandon-tasks-of-key", "charlie"])
    assert held.exit_code == 3, held.output
    # Asked by the label the first run gave it: abandoned with their task ids kept, and requeued.
    gave_up = cli.invoke(main, ["retry", str(manifest), "--abandon-tasks-of-key", "charlie"])
    assert gave_up.exit_code == 0 and "gave up 8 tasks of charlie" in gave_up.output, gave_up.output
    with Store(db_of(manifest)) as store:
        rows = {a.id: a for r in store.iter_requests() for a in r.attempt_rows if a.id in stuck}
        assert store.counts()["submitted"] == 0
        # What those tasks may have cost on charlie's account stays spent under --max-credits.
        assert store.credit_totals().spent == pytest.approx(spent_before)
    assert {i: a.task_id for i, a in rows.items()} == stuck
    assert all(a.state == "abandoned" and a.error_code == "key_abandoned" for a in rows.values())
    emu.advance(60)
    assert await run(manifest, emu.base_url, api_keys=",".join(KEYS[:2])) == 0
    assert check_outputs(manifest)["states"] == {"done": 60}
    per_request = tasks_per_request(emu.tasks())
    assert sorted(per_request.values()) == [1] * 52 + [2] * 8  # only the given-up ones were sent again
    assert all(t["account"] != acct(KEYS[2]) for t in emu.tasks() if t["id"] not in stuck.values())
