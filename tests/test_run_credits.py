"""One key's account: running out of credits (a 402 on a submit stops new submissions, the tasks already paid
for finish and download, nothing is left open or used up, and after a top-up the job resumes with nothing
paid twice), the key's state and balance as status shows them, and what each run's summary says it spent."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchgen import catalog
from batchgen.results.status import collect
from batchgen.store.open import open_store
from batchgen.store.sqlite import Store
from tests.emulator_fixtures import API_KEY, EmulatorFactory
from tests.run_support import MODEL, check_outputs, db_of, json_events, prompts, run, write_job


async def test_out_of_credits_stops_submitting_and_finishes_what_was_paid_for(
        tmp_path: Path, emulator_factory: EmulatorFactory, capsys: pytest.CaptureFixture[str]) -> None:
    """A 402 on a submit means no task was made: that request goes back to pending with its attempt unused,
    nothing new is sent, and the tasks already paid for are polled and downloaded before the run stops."""
    price = catalog.get(MODEL).credits_for(1)  # type: ignore[union-attr]
    emu = await emulator_factory(latency_s=3.0, initial_credits=price * 3.5)  # three tasks' worth
    manifest = write_job(tmp_path, prompts(12), run={"rate": "100/s", "concurrency": 12})
    assert await run(manifest, emu.base_url) == 3
    summary = json_events(capsys.readouterr().out)[-1]
    assert summary["reason"] == "auth" and "402" in summary["message"] and "top up" in summary["message"]
    with Store(db_of(manifest)) as store:
        counts = store.counts()
        requests = list(store.iter_requests())
        rows = [a for r in requests for a in r.attempt_rows]
        reserved = store.credit_totals().reserved
    assert counts["done"] == 3 and counts["pending"] == 9, counts  # the paid tasks finished in this run
    assert not [a for a in rows if a.state in ("sending", "running")] and reserved == 0  # nothing left open
    assert all(r.attempt_no == 1 for r in rows)  # nothing was sent again in this run
    assert all(r.attempts == 0 for r in requests if r.state == "pending")  # the refusals used up no attempt
    emu.set_credits(API_KEY, 1000.0)  # the top-up
    assert await run(manifest, emu.base_url) == 0
    assert check_outputs(manifest)["states"] == {"done": 12}
    assert len(emu.tasks()) == 12  # nothing paid twice


async def test_the_only_keys_state_and_balance_are_recorded_for_status(
        tmp_path: Path, emulator_factory: EmulatorFactory) -> None:
    """As for each key of a pool: a working key shows its balance, a refused one why (before, one key always
    read `active`, with no balance, even after a 401)."""
    emu = await emulator_factory(initial_credits=250.0)
    manifest = write_job(tmp_path, prompts(2))
    assert await run(manifest, emu.base_url) == 0
    [key] = collect(db_of(manifest))["keys"]
    assert (key["state"], key["balance"]) == ("active", 250.0)
    emu.revoke(API_KEY)
    write_job(tmp_path, prompts(3))  # one more request, so the next run has work to send
    assert await run(manifest, emu.base_url) == 3
    [key] = collect(db_of(manifest))["keys"]
    assert key["state"] == "revoked" and key["reason"]


@pytest.mark.usefixtures("store_backend")
async def test_a_second_run_with_nothing_to_do_reports_no_credits_spent(
        tmp_path: Path, emulator_factory: EmulatorFactory, capsys: pytest.CaptureFixture[str]) -> None:
    """The summary's `run_credits_used` is what this run was charged; `credits_used` stays the job's total
    (before, nothing said what the run itself spent, and the text put the job's total under "this run")."""
    price = catalog.get(MODEL).credits_for(1)  # type: ignore[union-attr]
    emu = await emulator_factory()
    manifest = write_job(tmp_path, prompts(4))
    assert await run(manifest, emu.base_url) == 0
    first = json_events(capsys.readouterr().out)[-1]
    assert (first["run_credits_used"], first["credits_used"]) == (price * 4, price * 4)
    assert await run(manifest, emu.base_url) == 0
    second = json_events(capsys.readouterr().out)[-1]
    assert second["submitted"] == 0 and second["run_credits_used"] == 0, second
    assert second["credits_used"] == price * 4  # the job's total, as before


@pytest.mark.usefixtures("store_backend")
async def test_a_run_after_a_partial_one_reports_only_its_own_spend(
        tmp_path: Path, emulator_factory: EmulatorFactory, capsys: pytest.CaptureFixture[str]) -> None:
    """A run stopped by the credit cap, then one that finishes the job: each reports what it was charged,
    and the two add up to the job's total as the store records it."""
    price = catalog.get(MODEL).credits_for(1)  # type: ignore[union-attr]
    emu = await emulator_factory()
    manifest = write_job(tmp_path, prompts(10), run={"concurrency": 2})
    assert await run(manifest, emu.base_url, max_credits=price * 3.5) == 3
    first = json_events(capsys.readouterr().out)[-1]
    with open_store(db_of(manifest)) as store:
        done_first = store.counts()["done"]
    assert 1 <= done_first < 10 and first["run_credits_used"] == pytest.approx(price * done_first), first
    assert await run(manifest, emu.base_url) == 0
    second = json_events(capsys.readouterr().out)[-1]
    with open_store(db_of(manifest)) as store:
        job_used = store.credit_totals().used
    assert job_used == pytest.approx(price * 10) and second["credits_used"] == pytest.approx(job_used)
    assert second["run_credits_used"] == pytest.approx(price * (10 - done_first)), second
    assert first["run_credits_used"] + second["run_credits_used"] == pytest.approx(job_used)
