"""The commands on a shared (PostgreSQL) store: `--db URL` / BATCHGEN_DB_URL and `--job` on run, status,
retry, export, report and review; status lists the live runners; no password in any output; the runner's share
of the budget and the output-folder rule (engine/shares.py)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from batchgen.cli import main
from batchgen.engine import shares
from batchgen.store.open import open_store
from batchgen.store.records import RunnerInfo
from tests.pg_fixtures import PG_PASSWORD, PgServer
from tests.run_support import prompts, write_job


def test_every_command_on_a_password_url_never_prints_the_password(tmp_path: Path, pg_server: PgServer) -> None:
    db = pg_server.new_database()
    pg_server.admin(f"ALTER DATABASE {db} OWNER TO batchpw")
    url = pg_server.url(db, user="batchpw", password=PG_PASSWORD)
    manifest = write_job(tmp_path, prompts(6), name="shop")
    cli = CliRunner()
    env = {"BATCHGEN_DB_URL": url}
    ran = cli.invoke(main, ["run", str(manifest), "--emulator"], env=env)
    assert ran.exit_code == 0, ran.output
    assert "no other runner shares it" in ran.output
    assert not (tmp_path / "job.batchgen.db").exists() and not list(tmp_path.glob("*.batchgen.db"))
    outputs = [ran.output]
    status = cli.invoke(main, ["status", str(manifest), "--json"], env=env)  # the job named by the manifest
    assert status.exit_code == 0, status.output
    data = json.loads(status.output)
    assert (data["job"], data["done"], data["images"], data["runners"]) == ("shop", 6, 6, [])
    outputs.append(status.output)
    for args in (["export", "--job", "shop", "--db", url, "-o", str(tmp_path / "x.csv")],
                 ["report", "--job", "shop", "--db", url, "-o", str(tmp_path / "r.html")],
                 ["retry", "--db", url],  # one job in the database: --job is optional
                 ["status", "--db", url, "--job", "nope"]):
        result = cli.invoke(main, args)
        outputs.append(result.output)
        assert result.exit_code == (2 if "nope" in args else 0), result.output
    assert len((tmp_path / "x.csv").read_text().splitlines()) == 7
    assert "no job named 'nope'" in outputs[-1]
    wrong = cli.invoke(main, ["status", "--db", url.replace(PG_PASSWORD, "wrong-" + PG_PASSWORD)])
    assert wrong.exit_code == 3 and "Traceback" not in wrong.output
    outputs.append(wrong.output)
    assert "batchpw:***@" in wrong.output
    assert not any(PG_PASSWORD in text for text in outputs)
    assert PG_PASSWORD not in (tmp_path / "r.html").read_text()
    other = cli.invoke(main, ["status", "--db", "mysql://u@h/db"])
    assert other.exit_code == 2 and "postgresql://" in other.output


def test_status_shows_the_live_runners(tmp_path: Path, pg_url: str) -> None:
    manifest = write_job(tmp_path, prompts(3), name="nightly")
    assert CliRunner().invoke(main, ["run", str(manifest), "--emulator", "--db", pg_url]).exit_code == 0
    with open_store(pg_url, "nightly") as runner:
        runner.runners.lock()  # a runner working on the job right now
        result = CliRunner().invoke(main, ["status", "--db", pg_url])
        data = json.loads(CliRunner().invoke(main, ["status", "--db", pg_url, "--json"]).output)
    assert result.exit_code == 0, result.output
    assert f"runner {socket.gethostname()} pid " in result.output and "0 requests in flight" in result.output
    assert [(r["host"], r["claimed"]) for r in data["runners"]] == [(socket.gethostname(), 0)]


def test_rate_share_splits_the_budget_between_live_runners() -> None:
    assert shares.rate_share(30.0, 3) == 10.0
    assert shares.rate_share(30.0, 0) == 30.0  # never divided by zero: this runner at least


def test_the_share_is_the_key_limiters_ceiling() -> None:
    from batchgen.engine.ratelimit import AdaptiveLimiter
    from batchgen.units import parse_rate

    limiter = AdaptiveLimiter(parse_rate("40/s"))
    shares.apply_share(limiter, 40.0, 4)
    assert limiter.ceiling == 10.0  # one runner of four: a quarter of the key's budget
    shares.apply_share(limiter, 40.0, 1)
    assert limiter.ceiling == 40.0  # the others stopped: the whole budget again, never above --rate


def runner(host: str) -> RunnerInfo:
    return RunnerInfo(id=host, host=host, pid=1, started_at=0.0, heartbeat_at=0.0)


@pytest.mark.parametrize(("others", "shared_fs", "refused"), [
    ([], False, False),  # alone
    (["this-host"], False, False),  # several runners on one host share its disk
    (["other-host"], True, False),  # a network file system every host mounts
    (["other-host"], False, True),  # a local folder and a runner elsewhere: refused
])
def test_a_local_output_folder_is_refused_across_hosts(tmp_path: Path, others: list[str], shared_fs: bool,
                                                        refused: bool) -> None:
    problem = shares.output_conflict(tmp_path, "this-host", [runner(h) for h in others], shared_fs=shared_fs)
    assert (problem is not None) == refused
    if problem:
        assert "other-host" in problem and "shared storage" in problem
    assert shares.is_network_filesystem(tmp_path) is False  # the test's temporary folder is local


async def test_max_credits_holds_for_the_job_as_a_whole(tmp_path: Path, pg_url: str,
                                                        emulator_factory: Any) -> None:
    from batchgen.store.records import NewAttempt
    from tests.run_support import run

    emu = await emulator_factory()
    manifest = write_job(tmp_path, prompts(12), name="capped", run={"concurrency": 2})  # 0.5 credits each
    assert CliRunner().invoke(main, ["validate", str(manifest)]).exit_code == 0
    with open_store(pg_url, "capped", create=True) as other:
        from batchgen.manifest.load import open_manifest

        other.sync(open_manifest(manifest))
        other.runners.lock()  # another live runner holds four tasks in flight: 2 credits reserved
        due = other.next_due(4)
        other.start_attempts([NewAttempt(r.key, 1, r.model, 0.5) for r in due])
        assert await run(manifest, emu.base_url, db_url=pg_url, max_credits=3.2) == 3
        with open_store(pg_url, "capped") as store:
            assert store.credit_totals().spent <= 3.2  # the other runner's reservations counted
        assert emu.stats()["tasks_created"] <= 2


async def test_max_runtime_counts_from_the_jobs_first_live_runner(tmp_path: Path, pg_url: str,
                                                                  emulator_factory: Any) -> None:
    import psycopg

    from tests.run_support import run

    emu = await emulator_factory()
    manifest = write_job(tmp_path, prompts(5), name="timed")
    with open_store(pg_url, "timed", create=True) as other:
        other.runners.lock()  # a runner that has been at it for an hour already
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("UPDATE jobs SET group_started_at = group_started_at - 3600")
        assert await run(manifest, emu.base_url, db_url=pg_url, max_runtime_s=600.0) == 3
    assert emu.stats()["tasks_created"] == 0  # the job's 10 minutes were used up before this runner came


def test_review_serves_a_job_of_a_shared_database_named_by_job(tmp_path: Path, pg_url: str) -> None:
    import re
    import signal
    import subprocess
    import sys
    import urllib.request

    for name, subject in (("alpha", "a grey alpha cat"), ("beta", "a brown beta dog")):
        manifest = write_job(tmp_path, prompts(2, subject), name=name)
        assert CliRunner().invoke(main, ["run", str(manifest), "--emulator", "--db", pg_url]).exit_code == 0
    ambiguous = CliRunner().invoke(main, ["review", "--db", pg_url, "--no-browser"])
    assert ambiguous.exit_code == 2 and "--job" in ambiguous.output, ambiguous.output
    proc = subprocess.Popen([sys.executable, "-m", "batchgen", "review", "--db", pg_url, "--job", "beta",
                             "--no-browser"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        match = re.search(r"http://127\.0\.0\.1:\d+/\?token=[\w-]+", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        page = urllib.request.urlopen(match.group(0), timeout=10).read().decode()
        assert "a brown beta dog 1" in page and "alpha" not in page
        image = re.search(r'/image/[^"?]+\?token=[\w-]+', page)
        assert image, "no image link on the page"
        with urllib.request.urlopen(match.group(0).split("/?")[0] + image.group(0), timeout=10) as r:
            assert r.status == 200 and r.read(4) == b"\x89PNG"  # from the job's local output folder
    finally:
        proc.send_signal(signal.SIGTERM)
        out: Any = proc.communicate(timeout=10)
    assert proc.returncode == 0, out
