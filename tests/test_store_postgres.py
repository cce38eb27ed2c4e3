"""What only the shared (PostgreSQL) store promises: several jobs in one database, claims that never
overlap, leases and takeover, sync once under a lock, job-wide start time, and no password anywhere.
Every test runs against a real throwaway PostgreSQL server (tests/pg_fixtures.py)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import psycopg
import pytest

from batchgen.errors import ConfigError, StoreUnavailableError
from batchgen.models import State
from batchgen.store.open import open_store
from batchgen.store.postgres import MIGRATIONS, PostgresStore
from batchgen.store.postgres_runners import PostgresRunners
from batchgen.store.records import NewAttempt, Outcome
from batchgen.store.scrub import scrub_url
from tests.pg_fixtures import PG_PASSWORD, PgServer
from tests.test_store import FakeManifest, keys_of


def pg(url: str, job: str = "t", lease_s: float = 5.0) -> PostgresStore:
    store = open_store(url, job, create=True, lease_s=lease_s)
    assert isinstance(store, PostgresStore)
    return store


def kill(store: PostgresStore, url: str) -> None:
    """What SIGKILL leaves behind: no more heartbeats, a lease running out (here: already run out)."""
    runners = store.runners
    assert isinstance(runners, PostgresRunners)
    runners._stop_beat.set()
    assert runners._heartbeat is not None
    runners._heartbeat.join()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE runners SET heartbeat_at = heartbeat_at - 3600 WHERE id = %s", (store.runner_id,))
    store.runner_id = None  # the process is gone: it never releases anything
    store.pool.close()


def test_blank_database_gets_every_migration_once(pg_url: str) -> None:
    with pg(pg_url) as store:
        assert store.applied_migrations() == [name for name, _ in MIGRATIONS]
        assert store.schema_version() == len(MIGRATIONS) == 7
        assert store.job_record() is None
    with pg(pg_url) as again:  # reopening applies nothing twice
        assert again.applied_migrations() == [name for name, _ in MIGRATIONS]


def test_jobs_share_a_database_without_seeing_each_other(tmp_path: Path, pg_url: str) -> None:
    with pg(pg_url, "alpha") as a, pg(pg_url, "beta") as b:
        a.sync(FakeManifest(tmp_path, ["x", "y"]))
        b.sync(FakeManifest(tmp_path, ["x", "y", "z"]))  # the same requests in another job are its own
        assert a.counts()["pending"] == 2 and b.counts()["pending"] == 3
        assert a.store_id != b.store_id  # idempotency keys never collide across jobs
        a.start_attempts([NewAttempt(k, 1, "z-image-turbo", 0.5) for k in keys_of(FakeManifest(tmp_path, ["x"]))])
        assert b.counts()["submitted"] == 0 and b.credit_totals().reserved == 0
    with pytest.raises(ConfigError, match=r"2 jobs \(alpha, beta\).*--job"):
        open_store(pg_url)
    with pytest.raises(ConfigError, match="no job named 'gamma'"):
        open_store(pg_url, "gamma")
    with open_store(pg_url, "beta") as b2:
        assert b2.counts()["pending"] == 3


def test_an_id_from_another_job_changes_nothing_there(tmp_path: Path, pg_url: str) -> None:
    """Attempt and run ids are database-wide serials, so every update by id is scoped by job as well: an id
    that reached the wrong job (a bug, a hand-edited call) cannot touch another job's rows."""
    columns = "state, task_id, submit_tries, credits_reserved, credits_used, result_urls, error_code, finished_at"

    def attempt(attempt_id: int) -> tuple[object, ...]:
        with psycopg.connect(pg_url) as conn:
            row = conn.execute(f"SELECT {columns} FROM attempts WHERE id = %s", (attempt_id,)).fetchone()
        assert row is not None
        return tuple(row)

    with pg(pg_url, "alpha") as alpha, pg(pg_url, "beta") as beta:
        alpha.sync(FakeManifest(tmp_path, ["a"]))
        mb = FakeManifest(tmp_path, ["b"])
        beta.sync(mb)
        [kb] = keys_of(mb)
        [bid] = beta.start_attempts([NewAttempt(kb, 1, "z-image-turbo", 0.5)])
        run_id = beta.run_log.start()
        before = attempt(bid)
        alpha.record_tasks([(bid, "task-unified-1-zzzzzzzz", 9.0, False)])
        alpha.retry_submit(bid, kb, 0.0, "http_503", "busy")
        alpha.record_outcomes([Outcome(bid, kb, "running", credits_reserved=9.0)])
        alpha.record_outcomes([Outcome(bid, kb, "completed", result_urls=("https://x/1.png",), credits_used=9.0)])
        alpha.record_outcomes([Outcome(bid, kb, "failed", error_code="bad", error_message="bad")])
        alpha.update_result_urls(bid, ["https://x/2.png"])
        alpha.abandon_attempt(bid, "gone", "gone")
        alpha.run_log.finish(run_id, 0, "finished", {"images": 1})
        assert attempt(bid) == before
        assert [r["finished_at"] for r in beta.run_log.all()] == [None]
        # and the same calls by the job that owns the ids do land
        beta.record_tasks([(bid, "task-unified-1-bbbbbbbb", 0.5, False)])
        beta.run_log.finish(run_id, 0, "finished", {"images": 1})
        assert attempt(bid)[:3] == ("running", "task-unified-1-bbbbbbbb", before[2] + 1)
        assert [r["exit_code"] for r in beta.run_log.all()] == [0]


def test_two_runners_never_claim_the_same_request(tmp_path: Path, pg_url: str) -> None:
    m = FakeManifest(tmp_path, [f"p{i}" for i in range(40)])
    with pg(pg_url) as a, pg(pg_url) as b:
        a.sync(m)
        a.runners.lock()
        b.runners.lock()
        got_a = {r.key for r in a.next_due(15)}
        got_b = {r.key for r in b.next_due(100)}
        assert len(got_a) == 15 and len(got_b) == 25 and not got_a & got_b
        assert b.next_due(100) and not (got_a & {r.key for r in b.next_due(100)})  # b only re-sees its own
        assert {r.id for r in a.runners.live()} == {a.runner_id, b.runner_id}


def test_a_dead_runners_attempts_are_taken_over_with_their_keys(tmp_path: Path, pg_url: str) -> None:
    m = FakeManifest(tmp_path, ["a", "b", "c"])
    a, b = pg(pg_url), pg(pg_url)
    try:
        a.sync(m)
        a.runners.lock()
        b.runners.lock()
        ka, kb, kc = keys_of(m)
        assert {r.key for r in a.next_due(10)} == {ka, kb, kc}
        ids = a.start_attempts([NewAttempt(k, 1, "z-image-turbo", 0.5) for k in (ka, kb)])
        a.record_task(ids[0], "task-unified-1-aaaaaaaa", 0.5, replayed=False)
        assert b.runners.take_over() == [] and b.next_due(10) == []  # a is live: nothing to take, nothing to claim
        kill(a, pg_url)
        taken = b.runners.take_over()
        assert [(r.key, att.task_id) for r, att in taken] == [(ka, "task-unified-1-aaaaaaaa"), (kb, None)]
        assert [att.idempotency_key for _, att in taken] == [b.idempotency_key(k, 1) for k in (ka, kb)]
        assert b.runners.take_over() == []  # claimed now: taken once
        assert [r.key for r in b.next_due(10)] == [kc]  # a's claimed-but-unsent request is free again
        with psycopg.connect(pg_url) as conn:
            owners = {r[0] for r in conn.execute("SELECT runner_id FROM attempts").fetchall()}
        assert owners == {b.runner_id}
        assert [r.id for r in b.runners.live()] == [b.runner_id]
    finally:
        b.close()


def test_a_clean_stop_hands_over_at_once(tmp_path: Path, pg_url: str) -> None:
    m = FakeManifest(tmp_path, ["a"])
    with pg(pg_url, lease_s=3600) as a, pg(pg_url, lease_s=3600) as b:
        a.sync(m)
        a.runners.lock()
        b.runners.lock()
        [k] = [r.key for r in a.next_due(1)]
        a.start_attempts([NewAttempt(k, 1, "z-image-turbo", 0.5)])
        a.runners.unlock()  # `batchgen run` ends: its runner row is stopped and its requests released
        assert [r.key for r, _ in b.runners.take_over()] == [k]


def test_heartbeats_keep_a_short_lease_alive(tmp_path: Path, pg_url: str) -> None:
    with pg(pg_url, lease_s=0.6) as a, pg(pg_url, lease_s=0.6) as b:
        a.sync(FakeManifest(tmp_path, ["a"]))
        a.runners.lock()
        b.runners.lock()
        [k] = [r.key for r in a.next_due(1)]
        a.start_attempts([NewAttempt(k, 1, "z-image-turbo", 0.5)])
        time.sleep(1.5)  # 2.5 leases: only the heartbeat keeps a alive
        assert b.runners.take_over() == []
        assert len(b.runners.live()) == 2
        assert [r.claimed for r in b.runners.live() if r.id == a.runner_id] == [1]


def test_sync_runs_once_under_the_lock_and_an_older_manifest_is_not_synced_back(tmp_path: Path,
                                                                                  pg_url: str) -> None:
    manifest_file = tmp_path / "job.yaml"
    manifest_file.write_text("v2")
    new = FakeManifest(tmp_path, [f"p{i}" for i in range(300)])
    stores = [pg(pg_url) for _ in range(3)]
    results = []
    threads = [threading.Thread(target=lambda s=s: results.append(s.sync(new))) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert sorted(r.added for r in results) == [0, 0, 300]  # one expanded it, two found it done
        assert sum(r.skipped for r in results) == 2
        os.utime(manifest_file, (time.time() - 3600, time.time() - 3600))  # a runner with last hour's file
        old = FakeManifest(tmp_path, ["p0"])
        r = stores[0].sync(old)
        assert r.stale and r.skipped and r.total == 300
        assert stores[0].counts()["removed"] == 0
    finally:
        for s in stores:
            s.close()


def test_the_job_wide_start_is_kept_while_any_runner_lives(tmp_path: Path, pg_url: str) -> None:
    with pg(pg_url) as a, pg(pg_url) as b:
        a.runners.lock()
        time.sleep(0.3)
        b.runners.lock()  # joins a live group: the job's start stays a's
        assert b.runners.elapsed_s() >= 0.3
    with pg(pg_url) as c:
        c.runners.lock()  # a new group after everyone stopped: the clock starts again
        assert c.runners.elapsed_s() < 0.3


def test_no_password_in_the_database_or_messages(tmp_path: Path, pg_server: PgServer,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    db = pg_server.new_database()
    pg_server.admin(f"ALTER DATABASE {db} OWNER TO batchpw")
    url = pg_server.url(db, user="batchpw", password=PG_PASSWORD)
    with pg(url) as store:  # the password in the URL, as libpq reads it
        store.sync(FakeManifest(tmp_path, ["a"]))
        store.runners.lock()
        store.run_log.start()
        assert PG_PASSWORD not in store.location
    monkeypatch.setenv("PGPASSWORD", PG_PASSWORD)
    with pg(pg_server.url(db, user="batchpw")) as store:  # or from PGPASSWORD
        assert store.counts()[State.PENDING.value] == 1
    with psycopg.connect(pg_server.url(db)) as conn:
        dump = "\n".join(str(row) for table in ("jobs", "runners", "requests", "runs", "meta")
                         for row in conn.execute(f"SELECT * FROM {table}").fetchall())
    assert "batchpw" not in dump and PG_PASSWORD not in dump
    monkeypatch.delenv("PGPASSWORD")
    wrong = pg_server.url(db, user="batchpw", password="not-" + PG_PASSWORD)
    with pytest.raises(StoreUnavailableError) as info:
        open_store(wrong, "t")
    assert "not-" + PG_PASSWORD not in str(info.value) and "batchpw:***@" in str(info.value)


def test_scrub_url_removes_passwords_only() -> None:
    assert scrub_url("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert scrub_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert scrub_url("failed: host=h password=pw user=u") == "failed: host=h password=*** user=u"
    assert scrub_url("x postgresql://u:p%40ss@h/db?password=zz y") == "x postgresql://u:***@h/db?password=*** y"
    assert scrub_url("quoted pw", "postgresql://u:pw@h/db") == "quoted ***"


def test_a_runner_waits_only_for_work_others_hold(tmp_path: Path, pg_url: str) -> None:
    # A runner with nothing of its own left stays while others hold unfinished work (to take it over if they
    # die), but never for its own requests (tasks it left past max_wait): two runners would wait on each other.
    m = FakeManifest(tmp_path, ["a", "b"])
    with pg(pg_url) as a, pg(pg_url) as b:
        a.sync(m)
        a.runners.lock()
        b.runners.lock()
        ka, kb = keys_of(m)
        a.start_attempts([NewAttempt(r.key, 1, "z-image-turbo", 0.5) for r in a.next_due(1)])
        assert a.runners.unfinished_elsewhere() == 1  # b's request, not yet claimed by anyone
        b.start_attempts([NewAttempt(r.key, 1, "z-image-turbo", 0.5) for r in b.next_due(1)])
        # Each waits only for the other.
        assert a.runners.unfinished_elsewhere() == 1 and b.runners.unfinished_elsewhere() == 1
        a.finish_request(ka)
        b.finish_request(kb)
        assert a.runners.unfinished_elsewhere() == b.runners.unfinished_elsewhere() == 0


def test_a_shared_job_fsyncs_its_images(pg_url: str) -> None:
    """PostgreSQL's commits are durable, so a local folder's images are fsynced one by one (recovery.py)."""
    from batchgen.engine.recovery import images_durable

    with pg(pg_url) as store:
        assert images_durable(store) is True
