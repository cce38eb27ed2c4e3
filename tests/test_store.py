"""The store alone: migrations, sync (idempotent, removed/revived, rollback on a bad manifest), transitions,
the lock and the read API the export and report build on. The contract tests (`open_db`) run on SQLite and
on a real PostgreSQL server (tests/pg_fixtures.py); PostgreSQL's own rules are in test_store_postgres.py."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlite_utils

from batchgen.errors import ManifestError, Problem, StoreLockedError
from batchgen.models import GenerationRequest, JobSpec, PlannedRequest, State, request_key
from batchgen.store.base import BaseStore
from batchgen.store.open import open_store
from batchgen.store.sqlite import NewAttempt, Outcome, Store, idempotency_key
from batchgen.store.sqlite_migrations import NAMES, migration_set

OpenDb = Callable[[], BaseStore]


@pytest.fixture(params=["sqlite", "postgres"])
def open_db(request: pytest.FixtureRequest, tmp_path: Path) -> OpenDb:
    """The store contract runs on both backends: each call opens the same test database again."""
    if request.param == "sqlite":
        return lambda: open_store(tmp_path / "s.db")
    url = request.getfixturevalue("pg_url")
    return lambda: open_store(url, "t", create=True)


class FakeManifest:
    """The Manifest contract (job, requests(), raise_if_problems(), fingerprint()) over a list of prompts."""

    def __init__(self, tmp: Path, prompts: list[str], bad: bool = False) -> None:
        self.job = JobSpec(name="t", manifest_path=tmp / "job.yaml")
        self.prompts = prompts
        self.bad = bad

    def requests(self) -> Iterator[PlannedRequest]:
        for i, prompt in enumerate(self.prompts):
            req = GenerationRequest(prompt=prompt, model="z-image-turbo")
            yield PlannedRequest(key=request_key(f"i{i}", {}, req), item_id=f"i{i}", request=req,
                                 metadata={"sku": f"S{i}"}, source=f"job.csv row {i + 2}")

    def raise_if_problems(self) -> None:
        if self.bad:
            raise ManifestError([Problem("job.csv", "row 3", "prompt", "is empty")])

    def fingerprint(self) -> str:
        return "fp-" + "|".join(self.prompts) + ("-bad" if self.bad else "")


def keys_of(m: FakeManifest) -> list[str]:
    return [p.key for p in m.requests()]


def test_blank_database_gets_every_migration(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        assert store.applied_migrations() == list(NAMES)
        assert store.schema_version() == len(NAMES)
        mode = store.conn.execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"
        assert store.job_record() is None


def test_up_to_date_database_opens_without_sqlite_utils(tmp_path: Path) -> None:
    # Importing sqlite-utils costs a run about 45 ms of CPU: it is loaded only when a schema step is due.
    probe = ("import sys; from batchgen.store.sqlite import Store; Store(sys.argv[1]).close(); "
             "print('sqlite_utils' in sys.modules)")
    path = tmp_path / "s.db"

    def opened_with_sqlite_utils() -> bool:
        out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=True)
        return out.stdout.strip() == "True"

    assert opened_with_sqlite_utils()  # a new database is migrated: sqlite-utils runs the steps
    assert not opened_with_sqlite_utils()  # up to date: one query, no import
    with Store(path) as store:
        assert store.applied_migrations() == list(NAMES)


def test_upgrade_from_m001_keeps_data(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite_utils.Database(path)
    migration_set().apply(db, stop_before="m002_runs")
    db.execute("INSERT INTO requests (key, item_id, params, model) VALUES ('k1', 'i1', '{}', 'z-image-turbo')")
    db.conn.commit()
    db.close()
    with Store(path) as store:
        assert "m002_runs" in store.applied_migrations()
        assert store.schema_version() == len(NAMES)  # every later migration applied too
        assert store.counts()["pending"] == 1
        run_id = store.run_log.start()
        store.run_log.finish(run_id, 0, "finished", {"done": 1})
        assert store.run_log.all()[0]["summary"] == {"done": 1}


def test_sync_is_idempotent_and_skips_on_same_fingerprint(tmp_path: Path, open_db: OpenDb) -> None:
    m = FakeManifest(tmp_path, ["a", "b", "c"])
    with open_db() as store:
        r1 = store.sync(m)
        assert (r1.added, r1.removed, r1.total, r1.skipped) == (3, 0, 3, False)
        r2 = store.sync(m)
        assert r2.skipped and r2.total == 3
        m.prompts = ["a", "b", "c"]  # a changed fingerprint with the same rows is still a no-op
        m.fingerprint = lambda: "other"  # type: ignore[method-assign]
        r3 = store.sync(m)
        assert (r3.added, r3.removed, r3.total) == (0, 0, 3)
        recs = list(store.iter_requests())
        assert [r.metadata["sku"] for r in recs] == ["S0", "S1", "S2"]  # manifest order
        assert recs[0].source == "job.csv row 2"
        job = store.job_record()
        assert job is not None and job["name"] == "t" and job["settings"]["max_attempts"] == 3


def test_removed_and_revived(tmp_path: Path, open_db: OpenDb) -> None:
    m = FakeManifest(tmp_path, ["a", "b", "c"])
    with open_db() as store:
        store.sync(m)
        _, kb, kc = keys_of(m)
        # b is in flight: it stays even when the row goes away
        [aid] = store.start_attempts([NewAttempt(kb, 1, "z-image-turbo", 0.5)])
        m.prompts = ["a"]
        r = store.sync(m)
        assert r.removed == 1 and r.total == 2
        assert store.counts()["removed"] == 1
        assert store.get_request(kc).state == State.REMOVED  # type: ignore[union-attr]
        assert store.get_request(kb).state == State.SUBMITTED  # type: ignore[union-attr]
        m.prompts = ["a", "b", "c", "d"]
        r = store.sync(m)
        assert r.added == 2 and r.removed == 0 and r.total == 4
        assert store.get_request(kc).state == State.PENDING  # type: ignore[union-attr]
        assert aid > 0


def test_bad_manifest_changes_nothing(tmp_path: Path, open_db: OpenDb) -> None:
    with open_db() as store:
        store.sync(FakeManifest(tmp_path, ["a"]))
        with pytest.raises(ManifestError):
            store.sync(FakeManifest(tmp_path, ["x", "y", "z"], bad=True))
        assert store.counts()["pending"] == 1
        assert store.counts()["removed"] == 0
        job = store.job_record()
        assert job is not None and job["fingerprint"] == "fp-a"


def test_transitions_and_credit_totals(tmp_path: Path, open_db: OpenDb) -> None:
    m = FakeManifest(tmp_path, ["a", "b", "c"])
    with open_db() as store:
        store.sync(m)
        ka, kb, kc = keys_of(m)
        due = store.next_due(10)
        assert [r.key for r in due] == [ka, kb, kc]
        ids = store.start_attempts([NewAttempt(k, 1, "z-image-turbo", 0.5) for k in (ka, kb, kc)])
        assert store.counts()["submitted"] == 3 and store.next_due(10) == []
        assert store.credit_totals().reserved == 1.5
        # a killed run resumes: attempts without a task id are resubmitted with the same key
        open_ = store.open_attempts()
        assert [a.idempotency_key for _, a in open_] == [idempotency_key(k, 1, store.store_id) for k in (ka, kb, kc)]
        assert all(a.task_id is None for _, a in open_)
        store.record_task(ids[0], "task-unified-1-aaaaaaaa", 0.5, replayed=False)
        store.record_task(ids[1], "task-unified-1-bbbbbbbb", 0.5, replayed=True)
        store.record_outcomes([
            Outcome(ids[0], ka, "completed", result_urls=("http://x/1.png",), credits_used=0.5),
            Outcome(ids[1], kb, "requeue", error_code="generation_timeout", error_message="slow",
                    not_before=1e12),
            Outcome(ids[2], kc, "failed", error_code="content_policy_violation", error_message="no"),
        ])
        c = store.counts()
        assert (c["completed"], c["pending"], c["failed"]) == (1, 1, 1)
        assert store.next_due(10) == []  # b waits for its not_before
        assert store.next_not_before() == 1e12
        totals = store.credit_totals()
        assert (totals.reserved, totals.used) == (0, 0.5)
        from batchgen.store.sqlite import ImageRecord

        store.record_image(ImageRecord(ka, 1, "i0_1.png", "http://x/1.png", 10, "ab", 1, 1, "PNG", ids[0], 0.0),
                           done=True)
        assert store.get_request(ka).state == State.DONE  # type: ignore[union-attr]
        assert store.image_totals() == (1, 10)
        fails = store.failures_by_code()
        assert fails == [{"code": "content_policy_violation", "count": 1, "messages": [{"message": "no", "count": 1}]}]
        # retry: fresh budget, history kept
        assert store.requeue_failed(["other_code"]) == 0
        assert store.requeue_failed(None) == 1
        rec = store.get_request(kc)
        assert rec is not None and rec.state == State.PENDING and rec.attempts == 0 and rec.attempt_no == 1
        assert rec.attempt_rows[0].error_code == "content_policy_violation"
        full = {r.key: r for r in store.iter_requests()}
        assert full[ka].images[0].path == "i0_1.png"
        assert full[kb].attempt_rows[0].replayed is True


def test_submit_retry_keeps_attempt_and_budget(tmp_path: Path, open_db: OpenDb) -> None:
    m = FakeManifest(tmp_path, ["a"])
    with open_db() as store:
        store.sync(m)
        [k] = keys_of(m)
        [aid] = store.start_attempts([NewAttempt(k, 1, "z-image-turbo", 0.5)])
        store.retry_submit(aid, k, 5.0, "http_503", "busy")
        rec = store.get_request(k)
        assert rec is not None and rec.state == State.SUBMITTED and rec.not_before == 5.0
        assert rec.attempt_rows[0].submit_tries == 1
        # a requeue that does not consume an attempt gives the increment back
        store.record_outcomes([Outcome(aid, k, "requeue", error_code="result_expired", consume_attempt=False)])
        assert store.get_request(k).attempts == 0  # type: ignore[union-attr]


def test_lock_names_holder_and_is_released(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Store(path) as a, Store(path) as b:
        a.runners.lock()
        with pytest.raises(StoreLockedError) as info:
            b.runners.lock()
        assert "pid" in str(info.value) and "in use" in str(info.value)
        a.runners.unlock()
        b.runners.lock()


def test_readers_see_commits_while_a_writer_is_open(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Store(path) as store:
        store.sync(FakeManifest(tmp_path, ["a", "b"]))
        reader = sqlite3.connect(path)
        assert reader.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 2
        reader.close()


def test_next_due_uses_the_state_index(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        plan = " ".join(str(r) for r in store.conn.execute(
            "EXPLAIN QUERY PLAN SELECT rowid, * FROM requests WHERE state='pending' AND not_before <= ? "
            "ORDER BY not_before, rowid LIMIT ?", (0, 1)))
        assert "requests_state_not_before" in plan and "TEMP B-TREE" not in plan


def test_upgrade_to_m005_keeps_images_as_not_checked(tmp_path: Path) -> None:
    # A job saved before the quality checks existed: its images read as "not checked" and can be reviewed.
    path = tmp_path / "old.db"
    db = sqlite_utils.Database(path)
    migration_set().apply(db, stop_before="m005_reviews")
    db.execute("INSERT INTO requests (key, item_id, params, model, state) VALUES "
               "('k1', 'i1', '{}', 'z-image-turbo', 'done')")
    db.execute("INSERT INTO images (request_key, idx, path, bytes, sha256) VALUES ('k1', 1, 'i1_1.png', 9, 'ab')")
    db.conn.commit()
    db.close()
    with Store(path) as store:
        assert "m005_reviews" in store.applied_migrations()  # later ones (m006) apply too
        (img,) = store.images_for("k1")
        assert img.check_status is None and img.check_reasons is None
        assert store.reviews.decide("k1", 1, "ab", "reject", " blurry ").reason == "blurry"
        assert store.reviews.counts()["rejected"] == 1
        assert [r.key for r, _ in store.reviews.open_rejects()] == ["k1"]


def test_the_uploads_ledger_keeps_each_keys_files_apart_on_both_backends(open_db: OpenDb) -> None:
    """store.uploads: the newest live upload of a content per key, uploads from before keys were recorded
    counting as any key's (legacy), marks that only fill what they are given, and lookups by URL."""
    from batchgen.store.records import UploadRecord

    def up(file_id: str, uploaded_at: float, key_fp: str | None) -> UploadRecord:
        return UploadRecord(file_id, "sha-a", f"https://files.example/{file_id}", uploaded_at + 86_400, 10,
                            "image/png", "/photos/a.png", uploaded_at, key_fp=key_fp)

    with open_db() as store:
        ledger = store.uploads
        ledger.record(up("f-old", 100.0, None))  # before m006: no key recorded
        ledger.record(up("f-a", 200.0, "fp-a"))
        ledger.record(up("f-b", 300.0, "fp-b"))
    with open_db() as store:  # committed: a new connection sees them
        ledger = store.uploads
        assert ledger.current("sha-a").file_id == "f-b"  # any key: the newest
        assert ledger.current("sha-a", "fp-a").file_id == "f-a"
        assert ledger.current("sha-a", "fp-c").file_id == "f-old"  # legacy counts as this key's
        assert ledger.current("sha-a", "fp-c", legacy=False) is None
        assert ledger.current("sha-other") is None
        ledger.mark("f-a", checked_at=250.0)
        ledger.mark("f-a", suspect_at=260.0)  # leaves checked_at as it was
        ledger.mark("f-b", deleted_at=400.0)
        assert [r.file_id for r in ledger.live("fp-a", legacy=False)] == ["f-a"]
        assert {r.file_id for r in ledger.live()} == {"f-old", "f-a"}  # f-b deleted
        (a,) = ledger.by_url(["https://files.example/f-a", "https://files.example/f-a"])
        assert (a.checked_at, a.suspect_at, a.deleted_at, a.key_fp) == (250.0, 260.0, None, "fp-a")
        assert ledger.by_url([]) == []
        assert ledger.current("sha-a").file_id == "f-a"  # the deleted one is no longer current
