"""The wording of text output: a count reads with its noun in the singular or plural ("1 image", "2 images"),
credits read as plain decimals ("1,000,000", never "1e+06"); JSON keeps its keys and bare numbers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from batchgen.cli import main
from batchgen.engine.progress import Progress
from batchgen.engine.runstate import Counters
from batchgen.results.status import render_text
from batchgen.units import credits_text, plural
from tests.run_support import prompts, write_job


@pytest.mark.parametrize(("value", "text"), [
    (1e6, "1,000,000"), (2.00002e6, "2,000,020"), (0, "0"), (0.5, "0.5"), (19.2, "19.2"), (6.4000001, "6.4"),
    (1234.567, "1,234.57"), (-0.001, "0"), (3000, "3,000"),
])
def test_credits_read_as_plain_decimals(value: float, text: str) -> None:
    assert credits_text(value) == text


def test_plural() -> None:
    assert [plural(n, "request") for n in (0, 1, 2)] == ["0 requests", "1 request", "2 requests"]
    assert plural(1, "poll call") == "1 poll call" and plural(3, "entry", "entries") == "3 entries"
    assert plural(1, "image", width=4) == "   1 image"


def test_a_one_request_run_reads_in_the_singular_with_a_plain_balance(tmp_path: Path) -> None:
    manifest = write_job(tmp_path, prompts(1))
    ran = CliRunner().invoke(main, ["run", str(manifest), "--emulator"])
    assert ran.exit_code == 0, ran.output
    # The emulator's starting balance is a million credits: `:g` printed "balance 1e+06 credits".
    assert "balance 1,000,000 credits, this run needs about 0.5" in ran.output
    assert "1 submitted, 1 image saved, " in ran.output and "1 images" not in ran.output
    validated = CliRunner().invoke(main, ["validate", str(manifest)])
    assert "OK — 1 request, 1 image, about 0.5 credits (estimate)" in validated.output
    assert "       1 request         1 image" in validated.output  # the per-model table stays aligned
    retried = CliRunner().invoke(main, ["retry", str(manifest)])
    assert "requeued 0 failed requests;" in retried.output
    exported = CliRunner().invoke(main, ["export", str(manifest), "-o", str(tmp_path / "x.csv")])
    assert "wrote 1 row to" in exported.output


def test_the_run_summary_says_what_this_run_spent_and_the_job_total_apart(tmp_path: Path) -> None:
    """A second run with nothing to do spent nothing: "this run" used to show the job's total (1.5 here)."""
    manifest = write_job(tmp_path, prompts(3))  # z-image-turbo: 0.5 credits each
    first = CliRunner().invoke(main, ["run", str(manifest), "--emulator"])
    assert first.exit_code == 0, first.output
    assert "0 in flight; job total 1.5 credits used\n" in first.output
    assert "this run: 3 submitted, 3 images saved, " in first.output and "s; credits used 1.5\n" in first.output
    again = CliRunner().invoke(main, ["run", str(manifest), "--emulator"])
    assert again.exit_code == 0, again.output
    assert "0 in flight; job total 1.5 credits used\n" in again.output
    assert "this run: 0 submitted, 0 images saved, " in again.output and "s; credits used 0\n" in again.output


def test_several_keys_balance_reads_plainly_and_json_keeps_numbers(tmp_path: Path) -> None:
    manifest = write_job(tmp_path, prompts(2))
    ran = CliRunner().invoke(main, ["run", str(manifest), "--emulator"], env={"EVOLINK_API_KEYS": "sk-a,sk-b"})
    assert ran.exit_code == 0, ran.output
    assert "2 keys, balance 2,000,000 credits together, this run needs about 1" in ran.output
    again = CliRunner().invoke(main, ["run", str(manifest), "--emulator", "--json"])
    events = [json.loads(line) for line in again.output.splitlines() if line.startswith("{")]
    summary = next(e for e in events if e["event"] == "summary")
    assert summary["images_saved"] == 0 and isinstance(summary["credits_used"], float | int)


def test_a_stop_at_the_credit_cap_says_to_raise_it_not_to_run_the_same_command(tmp_path: Path) -> None:
    manifest = write_job(tmp_path, prompts(4))
    ran = CliRunner().invoke(main, ["run", str(manifest), "--emulator", "--max-credits", "1"])
    assert ran.exit_code == 3, ran.output
    assert "run again with a higher --max-credits to go on (the cap counts the job's spend over all its runs)" \
        in ran.output
    assert "run the same command again" not in ran.output
    help_text = " ".join(CliRunner().invoke(main, ["run", "--help"]).output.split())
    assert "the job's spend, over all its runs, would pass X credits" in help_text


def test_a_balance_the_api_does_not_report_is_unknown_not_zero(tmp_path: Path) -> None:
    manifest = write_job(tmp_path, prompts(2))
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text("credits_endpoint: false\n")
    ran = CliRunner().invoke(main, ["run", str(manifest), "--emulator", "--emulator-scenario", str(scenario),
                                    "--json"], env={"EVOLINK_API_KEYS": "sk-a,sk-b"})
    assert ran.exit_code == 0, ran.output
    events = [json.loads(line) for line in ran.stdout.splitlines() if line.startswith("{")]
    preflight = next(e for e in events if e["event"] == "preflight")
    assert preflight["remaining"] is None and preflight["keys_with_balance"] == 0 and preflight["keys"] == 2
    assert "2 keys, balance unknown (the API did not report one), this run needs about 1" in preflight["message"]


def test_the_run_summary_and_status_text_pluralise_and_print_credits_plainly() -> None:
    out = io.StringIO()
    Progress("plain", Counters(), out=out, err=io.StringIO()).summary({
        "outcome": "finished", "done": 1, "total": 1, "failed": 0, "pending": 0, "in_flight": 0, "submitted": 1,
        "images_saved": 1, "polls": 1, "elapsed_s": 1.0, "credits_used": 2000020.0, "credits_reserved": 1e6,
        "run_credits_used": 1500000.0, "message": "finished"})
    assert "0 in flight; job total 2,000,020 credits used, 1,000,000 reserved by tasks in flight\n" in out.getvalue()
    assert "1 submitted, 1 image saved, 1 poll call, 1.0s; credits used 1,500,000\n" in out.getvalue()
    text = render_text({
        "job": "j", "total": 3, "done": 1, "failed": 0, "pending": 1, "in_flight": 1, "waiting_retry": 0,
        "credits": {"used": 2000020.0, "reserved": 1e6, "estimated_remaining": 1.5e6}, "images": 1,
        "image_bytes": 10, "removed": 1, "failures": [],
        "review": {"approved": 0, "rejected": 1, "unreviewed": 0, "regenerating": 0, "set_aside": 1,
                   "check_failed": 0},
        "runners": [{"host": "h", "pid": 7, "since": 0, "claimed": 1}],
        "keys": [{"key": "team-a", "state": "active", "reason": None, "requests": 1, "credits_used": 1e6,
                  "in_flight": 0}, {"key": "team-b", "state": "revoked", "reason": "401", "requests": 2,
                                    "credits_used": 0.5, "in_flight": 1}],
    })
    assert "credits: 2,000,020 used, 1,000,000 reserved by tasks in flight, about 1,500,000 still to spend" in text
    assert "1 image set aside in _rejected/" in text and "removed: 1 request no longer in the manifest" in text
    assert "pid 7: since " in text and ", 1 request in flight" in text
    assert "team-a: 1 request, 1,000,000 credits used, active" in text
    assert "team-b: 2 requests, 0.5 credits used, 1 in flight, revoked (401)" in text
    assert "(s)" not in text and "e+0" not in text
