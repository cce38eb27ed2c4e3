"""The reviews ledger of the PostgreSQL store (`store.reviews`): images set aside, decisions, rejected requests
requeued.

The same operations as sqlite_reviews.py (whose docstrings describe each), scoped to the store's job
(`job_id` on every row) in the store's pooled transactions (`PostgresStore._tx`). `decide` locks the
request row (`FOR UPDATE OF r`) so a decision and a runner requeueing the same request cannot cross. A
failed check or a requeued reject changes its request's state in the same transaction as its own rows,
through the store's `_requeue` and `_fail`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from batchgen.models import State
from batchgen.store.records import RequestRecord, ReviewRecord, ReviewRefusedError, SetAsideRecord
from batchgen.store.reviews import ReviewLedger

if TYPE_CHECKING:
    import psycopg

    from batchgen.store.postgres import PostgresStore


class PostgresReviews(ReviewLedger):
    """Issue 16's reads and writes for one job of a PostgreSQL database."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store

    def reject_image(self, aside: SetAsideRecord, *, requeue: bool, code: str, message: str) -> None:
        now = time.time()
        with self.store._tx() as cur:
            self._insert_aside(cur, aside)
            if requeue:
                if aside.attempt_id is not None:
                    cur.execute("UPDATE attempts SET state='abandoned', error_code=%s, error_message=%s, "
                                "finished_at=%s WHERE id=%s", (code, message, now, aside.attempt_id))
                self.store._requeue(cur, aside.request_key, now, code, message, None, True, now)
            else:
                self.store._fail(cur, aside.request_key, code, message, now)

    def _insert_aside(self, cur: psycopg.Cursor[Any], a: SetAsideRecord) -> None:
        cur.execute("INSERT INTO set_aside (job_id, request_key, idx, attempt_id, path, sha256, bytes, width, height, "
                    "format, why, reason, created_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                    (self.store.job_id, a.request_key, a.idx, a.attempt_id, a.path, a.sha256, a.bytes, a.width,
                     a.height, a.format, a.why, a.reason, a.created_at))

    def set_aside_images(self) -> list[SetAsideRecord]:
        with self.store._tx(write=False) as cur:
            cur.execute("SELECT request_key, idx, attempt_id, path, sha256, bytes, width, height, format, why, reason, "
                        "created_at FROM set_aside WHERE job_id = %s ORDER BY id", (self.store.job_id,))
            return [SetAsideRecord(*row) for row in cur.fetchall()]

    _LATEST = ("id IN (SELECT MAX(id) FROM reviews WHERE job_id = %(job)s GROUP BY request_key, idx, sha256)")

    def latest(self) -> dict[tuple[str, int, str], ReviewRecord]:
        with self.store._tx(write=False) as cur:
            cur.execute("SELECT request_key, idx, sha256, attempt_id, decision, reason, decided_at, acted_at "
                        f"FROM reviews WHERE {self._LATEST}", self.store._a())  # type: ignore[arg-type]
            return {(r[0], r[1], r[2]): ReviewRecord(*r) for r in cur.fetchall()}

    def decide(self, request_key: str, idx: int, sha256: str, decision: str, reason: str | None) -> ReviewRecord:
        if decision not in ("approve", "reject"):
            raise ReviewRefusedError(f'decision must be "approve" or "reject", not "{decision}"')
        reason = (reason or "").strip() or None
        with self.store._tx() as cur:
            row = cur.execute("SELECT i.sha256, i.attempt_id, r.state FROM images i JOIN requests r ON "
                              "r.job_id = i.job_id AND r.key = i.request_key WHERE i.job_id=%s AND i.request_key=%s "
                              "AND i.idx=%s FOR UPDATE OF r", (self.store.job_id, request_key, idx)).fetchone()
            if row is None or row[0] != sha256:
                raise ReviewRefusedError("this image has been replaced by a newer one (regenerated); reload the "
                                         "page to review the current image", superseded=True)
            if row[2] != State.DONE.value:
                raise ReviewRefusedError(f"this request is {row[2]}: it is being generated again; reload the page "
                                         "once the run has finished", superseded=True)
            last = cur.execute("SELECT request_key, idx, sha256, attempt_id, decision, reason, decided_at, acted_at "
                               "FROM reviews WHERE job_id=%s AND request_key=%s AND idx=%s AND sha256=%s "
                               "ORDER BY id DESC LIMIT 1", (self.store.job_id, request_key, idx, sha256)).fetchone()
            if last is not None and last[4] == decision and (reason is None or last[5] == reason):
                return ReviewRecord(*last)
            now = time.time()
            cur.execute("INSERT INTO reviews (job_id, request_key, idx, sha256, attempt_id, decision, reason, "
                        "decided_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s)",
                        (self.store.job_id, request_key, idx, sha256, row[1], decision, reason, now))
            return ReviewRecord(request_key, idx, sha256, row[1], decision, reason, now, None)

    def open_rejects(self) -> list[tuple[RequestRecord, list[ReviewRecord]]]:
        with self.store._tx(write=False) as cur:
            cur.execute(
                "SELECT v.request_key, v.idx, v.sha256, v.attempt_id, v.decision, v.reason, v.decided_at, v.acted_at "
                "FROM reviews v JOIN images i ON i.job_id = v.job_id AND i.request_key = v.request_key AND "
                "i.idx = v.idx AND i.sha256 = v.sha256 JOIN requests r ON r.job_id = v.job_id AND "
                "r.key = v.request_key AND r.state = 'done' WHERE v.job_id = %(job)s AND v.acted_at IS NULL AND "
                f"v.decision = 'reject' AND v.{self._LATEST} ORDER BY r.seq, v.idx", self.store._a())  # type: ignore[arg-type]
            rows = cur.fetchall()
        by_key: dict[str, list[ReviewRecord]] = {}
        for row in rows:
            by_key.setdefault(row[0], []).append(ReviewRecord(*row))
        out = []
        for key, reviews in by_key.items():
            req = self.store.get_request(key)
            if req is not None:
                out.append((req, reviews))
        return out

    def requeue_rejected(self, request_key: str, asides: Sequence[SetAsideRecord], reason: str) -> None:
        now = time.time()
        with self.store._tx() as cur:
            for a in asides:
                self._insert_aside(cur, a)
            cur.execute("DELETE FROM images WHERE job_id=%s AND request_key=%s", (self.store.job_id, request_key))
            cur.execute("UPDATE reviews SET acted_at=%s WHERE job_id=%s AND request_key=%s AND acted_at IS NULL "
                        "AND decision='reject'", (now, self.store.job_id, request_key))
            self.store._requeue(cur, request_key, 0.0, "review_rejected", reason, None, True, now)

    def counts(self) -> dict[str, int]:
        latest = self.latest()
        out = {"approved": 0, "rejected": 0, "unreviewed": 0}
        with self.store._tx(write=False) as cur:
            cur.execute("SELECT request_key, idx, sha256 FROM images WHERE job_id = %s", (self.store.job_id,))
            for key, idx, sha in cur.fetchall():
                rv = latest.get((key, idx, sha))
                out["approved" if rv and rv.decision == "approve" else "rejected" if rv else "unreviewed"] += 1
        out["regenerating"] = int(self.store._one(
            "SELECT COUNT(DISTINCT request_key) FROM set_aside WHERE job_id = %(job)s AND why='review' AND "
            "request_key IN (SELECT key FROM requests WHERE job_id = %(job)s AND state IN "
            "('pending', 'submitted', 'completed'))", self.store._a()))
        out["set_aside"] = int(self.store._one("SELECT COUNT(*) FROM set_aside WHERE job_id = %s",
                                               (self.store.job_id,)))
        out["check_failed"] = int(self.store._one("SELECT COUNT(*) FROM images WHERE job_id = %s AND "
                                                  "check_status='failed'", (self.store.job_id,)))
        return out

