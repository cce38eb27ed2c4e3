"""The store alone: migrations, sync (idempotent, removed/revived, rollback on a bad manifest), transitions,
the lock and the read API the export and report build on. The contract tests (`open_db`) run on SQLite and
on a real PostgreSQL server (tests/pg_fixtures.py); PostgreSQL's own rules are in test_store_postgres.py."""

from __future__ import annotations

import os
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
from batchgen.store.keystates import KeyStates
from batchgen.store.open import open_store
from batchgen.store.records import AttemptState, ImageRecord, ReviewRefusedError, SetAsideRecord, UploadRecord
from batchgen.store.reviews import ReviewLedger
from batchgen.store.runlog import RunLog
from batchgen.store.runners import Runners
from batchgen.store.sqlite import NewAttempt, Outcome, Store, idempotency_key
from batchgen.store.sqlite_migrations import NAMES, migration_set
from batchgen.store.uploads import UploadLedger

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
    # As a real sync left it: the job row and its requests stamped with the job's generation.
    db.execute("INSERT INTO job (id, name, sync_gen) VALUES (1, 'old', 1)")
    db.execute("INSERT INTO requests (key, item_id, params, model, sync_gen) "
               "VALUES ('k1', 'i1', '{}', 'z-image-turbo', 1)")
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
        # b is in flight: it keeps its state (its task is still collected) but leaves the job
        [aid] = store.start_attempts([NewAttempt(kb, 1, "z-image-turbo", 0.5)])
        m.prompts = ["a"]
        r = store.sync(m)
        assert r.removed == 2 and r.total == 1
        assert store.counts()["removed"] == 2 and store.counts()["submitted"] == 0
        assert store.get_request(kc).state == State.REMOVED  # type: ignore[union-attr]
        assert store.get_request(kb).state == State.SUBMITTED  # type: ignore[union-attr]
        assert [a.request_key for a in (at for _, at in store.open_attempts())] == [kb]
        m.prompts = ["a", "b", "c", "d"]
        r = store.sync(m)
        assert r.added == 3 and r.removed == 0 and r.total == 4
        assert store.counts()["submitted"] == 1
        assert store.get_request(kc).state == State.PENDING  # type: ignore[union-attr]
        assert aid > 0


def test_done_requests_no_longer_in_the_manifest_leave_the_results_and_come_back(
        tmp_path: Path, open_db: OpenDb) -> None:
    # Found by a new-user walkthrough: a deleted or edited row's done requests stayed in status and export.
    m = FakeManifest(tmp_path, ["a", "b", "c"])
    with open_db() as store:
        store.sync(m)
        ka, kb, kc = keys_of(m)
        for n, k in enumerate((ka, kb, kc)):
            done_with_image(store, k, f"sha-{n}")
        store.reviews.decide(kb, 1, "sha-1", "reject", "wrong colour")
        m.prompts = ["a", "B edited"]  # c deleted, b edited: a new key for row 2
        r = store.sync(m)
        [kb2] = keys_of(m)[1:]
        assert (r.added, r.removed, r.total) == (1, 2, 2)
        counts = store.counts()
        assert (counts["done"], counts["pending"], counts["removed"]) == (1, 1, 2)
        assert [rec.key for rec in store.iter_requests()] == [ka, kb2]
        assert store.image_totals() == (1, 10)
        assert store.reviews.counts()["rejected"] == 0
        assert store.reviews.open_rejects() == []  # never regenerated for a row that is gone
        # Nothing deleted: the superseded requests keep their state and images.
        assert store.get_request(kc).state == State.DONE  # type: ignore[union-attr]
        assert [i.sha256 for i in store.images_for(kc)] == ["sha-2"]
        # The same manifest again takes the fingerprint fast path: still the same live set.
        assert store.sync(m).skipped and store.counts()["removed"] == 2
        # The rows come back: done again with their images, nothing to submit.
        m.prompts = ["a", "b", "c"]
        r = store.sync(m)
        assert (r.added, r.removed, r.total) == (2, 1, 3)
        assert store.counts()["done"] == 3 and store.counts()["removed"] == 1
        assert [rec.key for rec in store.iter_requests()] == [ka, kb, kc]
        assert store.image_totals() == (3, 30)
        assert [rec.key for rec in store.next_due(10)] == []


def test_a_request_whose_row_went_while_in_flight_is_not_sent_again(tmp_path: Path, open_db: OpenDb) -> None:
    """Requeued (a retryable failure) or failed and retried after its row left the manifest: `removed`,
    never pending, so no run pays for an image the manifest no longer asks for; it returns with its row."""
    m = FakeManifest(tmp_path, ["a", "b"])
    with open_db() as store:
        store.sync(m)
        ka, kb = keys_of(m)
        ia, ib = store.start_attempts([NewAttempt(ka, 1, "z-image-turbo", 0.5),
                                       NewAttempt(kb, 1, "z-image-turbo", 0.5)])
        m.prompts = []  # both rows deleted while their tasks run
        store.sync(m)
        store.record_outcomes([Outcome(ia, ka, "requeue", error_code="generation_failed", not_before=0.0),
                               Outcome(ib, kb, "failed", error_code="content_policy_violation")])
        assert store.get_request(ka).state == State.REMOVED  # type: ignore[union-attr]
        assert store.requeue_failed() == 0
        assert store.next_due(10) == [] and not store.has_pending()
        m.prompts = ["a", "b"]
        store.sync(m)
        assert [r.key for r in store.next_due(10)] == [ka]


def test_images_moved_aside_and_back_as_rows_leave_and_return(tmp_path: Path, open_db: OpenDb) -> None:
    """The store's part of engine/names.py: who is live, where an image now is, which live images are aside."""
    m = FakeManifest(tmp_path, ["a", "b"])
    with open_db() as store:
        store.sync(m)
        ka, kb = keys_of(m)
        done_with_image(store, ka, "sha-a")
        done_with_image(store, kb, "sha-b")
        assert store.is_live(ka) and store.is_live(kb)
        m.prompts = ["a"]
        store.sync(m)
        assert store.is_live(ka) and not store.is_live(kb)
        store.move_image(kb, 1, "_superseded/b_1.sha-b.png")
        assert store.images_for(kb)[0].path == "_superseded/b_1.sha-b.png"
        assert store.path_owner([f"{kb}_1.png"]) is None
        assert store.live_images_under("_superseded/") == []  # b is not live: its image stays aside
        m.prompts = ["a", "b"]
        store.sync(m)
        assert [(i.request_key, i.path) for i in store.live_images_under("_superseded/")] == [
            (kb, "_superseded/b_1.sha-b.png")]
        assert store.live_images_under("xsuperseded/") == []  # a prefix, not a pattern


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
    db.execute("INSERT INTO job (id, name, sync_gen) VALUES (1, 'old', 1)")
    db.execute("INSERT INTO requests (key, item_id, params, model, state, sync_gen) VALUES "
               "('k1', 'i1', '{}', 'z-image-turbo', 'done', 1)")
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


# -- the ledgers' contract: reviews, run log, key states, runners, job scope ----------------------------------


def completed(store: BaseStore, keys: list[str], key_fp: str | None = None, attempt_no: int = 1) -> list[int]:
    """Drive these requests through a finished task to `completed` (the images not yet saved): attempt ids."""
    ids = store.start_attempts([NewAttempt(k, attempt_no, "z-image-turbo", 0.5, key_fp=key_fp) for k in keys])
    store.record_tasks([(aid, f"task-unified-1-{aid:08d}", 0.5, False) for aid in ids])
    store.record_outcomes([Outcome(aid, k, "completed", result_urls=(f"http://x/{aid}.png",), credits_used=0.5)
                           for aid, k in zip(ids, keys, strict=True)])
    return ids


def done_with_image(store: BaseStore, key: str, sha256: str, key_fp: str | None = None, attempt_no: int = 1) -> int:
    """A request done with one saved image (idx 1) of this content, as a run leaves it: its attempt id."""
    [aid] = completed(store, [key], key_fp, attempt_no)
    store.record_images([(ImageRecord(key, 1, f"{key}_1.png", f"http://x/{aid}.png", 10, sha256, 1, 1, "PNG",
                                      aid, 1.0), True)])
    return aid


def aside(key: str, attempt_id: int | None, sha256: str, why: str, reason: str | None) -> SetAsideRecord:
    return SetAsideRecord(key, 1, attempt_id, f"_rejected/{key}_1-{sha256}.png", sha256, 10, 1, 1, "PNG", why,
                          reason, 2.0)


def test_every_ledger_is_an_instance_of_its_interface_on_both_backends(open_db: OpenDb) -> None:
    """The store declares its ledgers only as annotations: nothing else holds a backend to the interfaces."""
    with open_db() as store:
        for name, interface in (("uploads", UploadLedger), ("reviews", ReviewLedger), ("run_log", RunLog),
                                ("key_states", KeyStates), ("runners", Runners)):
            assert isinstance(getattr(store, name), interface), name


def test_a_reject_is_recorded_once_refused_on_a_stale_image_and_requeued_with_its_image_set_aside(
        tmp_path: Path, open_db: OpenDb) -> None:
    """store.reviews from a person's reject to the next run's requeue: what review, status and run rely on."""
    m = FakeManifest(tmp_path, ["a", "b"])
    with open_db() as store:
        store.sync(m)
        ka, kb = keys_of(m)
        aid = done_with_image(store, ka, "sha-a1")
        reviews = store.reviews
        rv = reviews.decide(ka, 1, "sha-a1", "reject", " blurry ")
        assert (rv.request_key, rv.idx, rv.sha256, rv.attempt_id, rv.decision, rv.reason, rv.acted_at) == (
            ka, 1, "sha-a1", aid, "reject", "blurry", None)
        assert reviews.latest() == {(ka, 1, "sha-a1"): rv}
        assert reviews.counts() == {"approved": 0, "rejected": 1, "unreviewed": 0, "regenerating": 0,
                                    "set_aside": 0, "check_failed": 0}
        # The same decision again (a double click, a resent form) returns the recorded one and adds no row.
        assert reviews.decide(ka, 1, "sha-a1", "reject", "blurry") == rv
        assert reviews.decide(ka, 1, "sha-a1", "reject", None) == rv  # no reason given: the same decision
        assert reviews.latest() == {(ka, 1, "sha-a1"): rv}
        # A page showing an older image, or a request without one, is stale: refused as superseded.
        for key, sha in ((ka, "sha-older"), (kb, "sha-a1")):
            with pytest.raises(ReviewRefusedError) as info:
                reviews.decide(key, 1, sha, "approve", None)
            assert info.value.superseded is True
        # An image saved while its request is not done (the rest still downloading, or regenerating) is not final.
        [aid_b] = completed(store, [kb])
        store.record_images([(ImageRecord(kb, 1, "b_1.png", None, 10, "sha-b1", 1, 1, "PNG", aid_b, 1.0), False)])
        with pytest.raises(ReviewRefusedError, match="this request is completed") as info:
            reviews.decide(kb, 1, "sha-b1", "approve", None)
        assert info.value.superseded is True
        with pytest.raises(ReviewRefusedError) as info:
            reviews.decide(ka, 1, "sha-a1", "maybe", None)
        assert info.value.superseded is False
        assert reviews.latest() == {(ka, 1, "sha-a1"): rv}  # nothing refused was recorded

        [(req, decisions)] = reviews.open_rejects()
        assert (req.key, [i.sha256 for i in req.images], decisions) == (ka, ["sha-a1"], [rv])

        moved = aside(ka, aid, "sha-a1", "review", "blurry")
        reviews.requeue_rejected(ka, [moved], "rejected in review: blurry")
        again = store.get_request(ka)
        assert again is not None and again.state == State.PENDING and again.attempts == 1
        assert (again.error_code, again.error_message) == ("review_rejected", "rejected in review: blurry")
        assert reviews.open_rejects() == []  # acted on: the run after next does not requeue it again
        assert (ka, 1, "sha-a1") not in reviews.latest()  # acted on: about no image in the results any more
        assert reviews.set_aside_images() == [moved]
        assert store.images_for(ka) == []
        counts = reviews.counts()
        assert (counts["set_aside"], counts["regenerating"], counts["rejected"]) == (1, 1, 0)
        with pytest.raises(ReviewRefusedError) as info:  # the image left the results
            reviews.decide(ka, 1, "sha-a1", "approve", None)
        assert info.value.superseded is True


def test_a_regenerated_image_with_the_rejected_bytes_is_a_new_image_to_review(
        tmp_path: Path, open_db: OpenDb) -> None:
    """A model may draw the same picture again: after a reject was acted on, the new image is unreviewed
    (not "rejected" by the old decision), and rejecting it again is recorded and regenerates it again."""
    m = FakeManifest(tmp_path, ["a"])
    with open_db() as store:
        store.sync(m)
        [ka] = keys_of(m)
        aid = done_with_image(store, ka, "sha-same")
        reviews = store.reviews
        first = reviews.decide(ka, 1, "sha-same", "reject", "blurry")
        reviews.requeue_rejected(ka, [aside(ka, aid, "sha-same", "review", "blurry")], "rejected in review: blurry")
        aid2 = done_with_image(store, ka, "sha-same", attempt_no=2)  # the model drew the same bytes again
        assert reviews.latest() == {} and reviews.open_rejects() == []
        counts = reviews.counts()
        assert (counts["unreviewed"], counts["rejected"]) == (1, 0)
        second = reviews.decide(ka, 1, "sha-same", "reject", "blurry")  # the same words: still a new decision
        assert second != first and (second.attempt_id, second.acted_at) == (aid2, None)
        assert reviews.latest() == {(ka, 1, "sha-same"): second}
        [(req, decisions)] = reviews.open_rejects()
        assert (req.key, decisions) == (ka, [second])


def test_images_since_a_time_and_reopened_downloads(tmp_path: Path, open_db: OpenDb) -> None:
    """What the recovery after an unfinished run reads and writes (engine/recovery.py): the images recorded
    since a time, and done requests back to `completed`, so the engine checks and downloads them again."""
    m = FakeManifest(tmp_path, ["a", "b"])
    with open_db() as store:
        store.sync(m)
        ka, kb = keys_of(m)
        for key in (ka, kb):
            done_with_image(store, key, f"sha-{key}")  # recorded at created_at 1.0
        assert sorted(img.request_key for img in store.images_since(0.5)) == sorted([ka, kb])
        assert store.images_since(2.0) == []
        assert store.reopen_downloads([ka, "v1-not-a-request"]) == 1
        assert store.reopen_downloads([ka]) == 0  # only done requests are reopened
        assert [(r.key, a.state) for r, a in store.open_attempts()] == [(ka, "completed")]
        assert [i.sha256 for i in store.images_for(ka)] == [f"sha-{ka}"]  # kept: the engine checks it by hash
        assert store.counts()["done"] == 1


def test_an_image_failing_its_checks_is_set_aside_and_requeues_or_fails_its_request(
        tmp_path: Path, open_db: OpenDb) -> None:
    """reviews.reject_image is one transaction: the aside row, and a new attempt or the request failed."""
    m = FakeManifest(tmp_path, ["a", "b"])
    with open_db() as store:
        store.sync(m)
        ka, kb = keys_of(m)
        aid_a, aid_b = completed(store, [ka, kb])  # downloading: the checks run before the image is saved
        bad_a = aside(ka, aid_a, "sha-dark", "quality", "too dark")
        bad_b = aside(kb, aid_b, "sha-blank", "quality", "blank")
        store.reviews.reject_image(bad_a, requeue=True, code="quality_check_failed", message="image 1 is too dark")
        store.reviews.reject_image(bad_b, requeue=False, code="quality_check_failed", message="gave up")
        reqs = {r.key: r for r in store.iter_requests(with_history=True)}
        a, b = reqs[ka], reqs[kb]
        assert (a.state, a.error_code, a.attempts) == (State.PENDING, "quality_check_failed", 1)
        assert [(x.id, x.state, x.error_code) for x in a.attempt_rows] == [
            (aid_a, AttemptState.ABANDONED, "quality_check_failed")]
        assert (b.state, b.error_code, b.error_message) == (State.FAILED, "quality_check_failed", "gave up")
        assert store.get_request(kb).state == State.FAILED  # type: ignore[union-attr]
        assert store.reviews.set_aside_images() == [bad_a, bad_b]
        counts = store.reviews.counts()
        assert (counts["set_aside"], counts["regenerating"]) == (2, 0)  # a failed check is not a review's reject
        assert store.counts()["failed"] == 1 and store.counts()["pending"] == 1


def test_the_run_log_keeps_each_runs_end_and_summary(open_db: OpenDb) -> None:
    """store.run_log: status and the report read back how each run ended; a run still going has no end."""
    with open_db() as store:
        first = store.run_log.start()
        second = store.run_log.start()
        assert isinstance(first, int) and second != first
        store.run_log.finish(first, 3, "signal", {"images": 2})
    with open_db() as store:  # committed: a new connection sees them
        runs = store.run_log.all()
        assert [r["id"] for r in runs] == [first, second]
        ended, going = runs
        assert (ended["exit_code"], ended["reason"], ended["summary"]) == (3, "signal", {"images": 2})
        assert ended["finished_at"] >= ended["started_at"] and ended["pid"] == os.getpid()
        assert (going["finished_at"], going["exit_code"], going["reason"], going["summary"]) == (None,) * 4


def test_key_states_keep_the_last_balance_and_count_what_was_sent_with_each_key(
        tmp_path: Path, open_db: OpenDb) -> None:
    """store.key_states: `status` shows each key's last state and use; keys never recorded come last."""
    m = FakeManifest(tmp_path, ["a", "b", "c"])
    with open_db() as store:
        store.sync(m)
        ka, kb, kc = keys_of(m)
        keys = store.key_states
        keys.record("fp-a", "team-a", "active", balance=10.0)
        keys.record("fp-a", "team-a", "revoked", "401")  # no balance given: the last one is kept
        keys.record("fp-b", None, "active")  # no label: ordered by its fingerprint
        completed(store, [ka], key_fp="fp-a")
        store.start_attempts([NewAttempt(kb, 1, "z-image-turbo", 0.25, key_fp="fp-a"),
                              NewAttempt(kc, 1, "z-image-turbo", 0.75, key_fp="fp-0")])  # in flight
        assert keys.usage() == [
            {"fingerprint": "fp-b", "label": None, "state": "active", "reason": None, "balance": None,
             "requests": 0, "credits_used": 0.0, "credits_reserved": 0.0, "open": 0},
            {"fingerprint": "fp-a", "label": "team-a", "state": "revoked", "reason": "401", "balance": 10.0,
             "requests": 2, "credits_used": 0.5, "credits_reserved": 0.25, "open": 1},
            # seen only on an attempt: after the recorded keys, though its fingerprint sorts first
            {"fingerprint": "fp-0", "label": None, "state": "unknown", "reason": None, "balance": None,
             "requests": 1, "credits_used": 0.0, "credits_reserved": 0.75, "open": 1},
        ]


def test_abandoning_a_lost_keys_tasks_keeps_their_ids_and_cost_and_requeues_only_its_open_requests(
        tmp_path: Path, open_db: OpenDb) -> None:
    """`batchgen retry --abandon-tasks-of-key`: only `submitted` requests of that key; the task ids stay."""
    m = FakeManifest(tmp_path, ["a", "b", "c", "d"])
    with open_db() as store:
        store.sync(m)
        ka, kb, kc, kd = keys_of(m)
        completed(store, [ka], key_fp="fp-lost")  # results known: downloaded without any key, left alone
        ib, _, _ = store.start_attempts([NewAttempt(kb, 1, "z-image-turbo", 0.5, key_fp="fp-lost"),
                                         NewAttempt(kc, 1, "z-image-turbo", 0.25, key_fp="fp-lost"),
                                         NewAttempt(kd, 1, "z-image-turbo", 0.5, key_fp="fp-other")])
        store.record_task(ib, "task-unified-1-lost0001", 0.5, replayed=False)  # c's answer never came
        spent = store.credit_totals().spent
        assert store.abandon_tasks_of([], "key_abandoned", "x") == 0
        assert store.abandon_tasks_of(["fp-lost"], "key_abandoned", "given up") == 2
        states = {r.key: r for r in store.iter_requests()}
        assert [states[k].state for k in (ka, kb, kc, kd)] == [State.COMPLETED, State.PENDING, State.PENDING,
                                                                State.SUBMITTED]
        assert states[kb].attempts == 0 and states[kb].attempt_no == 1  # no attempt used; the next is a2
        b = states[kb].attempt_rows[0]
        assert (b.state, b.task_id, b.error_code) == ("abandoned", "task-unified-1-lost0001", "key_abandoned")
        assert store.credit_totals().spent == pytest.approx(spent)  # what they may cost is still counted
        assert store.abandon_tasks_of(["fp-lost"], "key_abandoned", "again") == 0


def test_closing_a_sqlite_store_releases_its_run_lock(tmp_path: Path) -> None:
    """close() unlocks the runners ledger, so the next `batchgen run` in this process (or any) may start."""
    path = tmp_path / "s.db"
    with open_store(path) as first:
        first.runners.lock()
        with open_store(path) as other, pytest.raises(StoreLockedError):
            other.runners.lock()  # held while the first store is open
    with open_store(path) as second:
        second.runners.lock()


def test_a_jobs_ledgers_are_invisible_to_another_job_in_the_same_postgres_database(
        tmp_path: Path, pg_url: str) -> None:
    """Every ledger of a shared database is scoped by job: beta never sees alpha's uploads, runs, keys or reviews."""
    m = FakeManifest(tmp_path, ["a", "b"])
    ka, kb = keys_of(m)
    upload = UploadRecord("f-1", "sha-u", "https://files.example/f-1", 1e12, 10, "image/png", "/a.png", 1.0,
                          key_fp="fp-a")
    with open_store(pg_url, "alpha", create=True) as alpha, open_store(pg_url, "beta", create=True) as beta:
        alpha.sync(m)
        beta.sync(m)  # the same request keys in both jobs
        alpha.uploads.record(upload)
        alpha.run_log.finish(alpha.run_log.start(), 0, "finished", {"images": 1})
        alpha.key_states.record("fp-a", "team-a", "active", balance=5.0)
        done_with_image(alpha, ka, "sha-a1", key_fp="fp-a")
        alpha.reviews.decide(ka, 1, "sha-a1", "reject", "blurry")
        [aid_b] = completed(alpha, [kb], key_fp="fp-a")
        alpha.reviews.reject_image(aside(kb, aid_b, "sha-blank", "quality", "blank"), requeue=False,
                                   code="quality_check_failed", message="gave up")
        # alpha sees all of it ...
        assert [u.file_id for u in alpha.uploads.live()] == ["f-1"]
        assert len(alpha.run_log.all()) == 1 and [k["fingerprint"] for k in alpha.key_states.usage()] == ["fp-a"]
        assert len(alpha.reviews.latest()) == 1 and [r.key for r, _ in alpha.reviews.open_rejects()] == [ka]
        assert len(alpha.reviews.set_aside_images()) == 1
        # ... beta none of it
        assert beta.uploads.live() == [] and beta.uploads.current("sha-u") is None
        assert beta.uploads.by_url([upload.file_url]) == []
        assert beta.run_log.all() == []
        assert beta.key_states.usage() == []  # not even alpha's attempts sent with fp-a
        assert beta.reviews.latest() == {} and beta.reviews.open_rejects() == []
        assert beta.reviews.set_aside_images() == []
        assert beta.reviews.counts() == {"approved": 0, "rejected": 0, "unreviewed": 0, "regenerating": 0,
                                         "set_aside": 0, "check_failed": 0}
        with pytest.raises(ReviewRefusedError):  # beta's request of the same key has no image to decide on
            beta.reviews.decide(ka, 1, "sha-a1", "approve", None)
        assert beta.counts()["pending"] == 2  # alpha's transitions left beta's requests alone
