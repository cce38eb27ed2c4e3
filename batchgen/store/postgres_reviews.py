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

from batchgen.store.live import POSTGRES_LIVE as LIVE
from batchgen.store.records import RequestRecord, ReviewRecord, SetAsideRecord
from batchgen.store.reviews import (
    ReviewLedger,
    by_request,
    checked_reason,
    count_images,
    current_image,
    latest_by_image,
    same_again,
)

if TYPE_CHECKING:
    import psycopg

    from batchgen.store.postgres import PostgresStore


# The images of live requests: the only ones that count in the results (live.py).
_LIVE_IMAGE = f"request_key IN (SELECT key FROM requests WHERE job_id = %(job)s AND {LIVE})"

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
                    self.store._abandon(cur, aside.attempt_id, code, message, now)
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
            return latest_by_image(cur.fetchall())

    def decide(self, request_key: str, idx: int, sha256: str, decision: str, reason: str | None) -> ReviewRecord:
        reason = checked_reason(decision, reason)
        with self.store._tx() as cur:
            row = cur.execute("SELECT i.sha256, i.attempt_id, r.state FROM images i JOIN requests r ON "
                              "r.job_id = i.job_id AND r.key = i.request_key WHERE i.job_id=%s AND i.request_key=%s "
                              "AND i.idx=%s FOR UPDATE OF r", (self.store.job_id, request_key, idx)).fetchone()
            image = current_image(row, sha256)
            last = cur.execute("SELECT request_key, idx, sha256, attempt_id, decision, reason, decided_at, acted_at "
                               "FROM reviews WHERE job_id=%s AND request_key=%s AND idx=%s AND sha256=%s "
                               "ORDER BY id DESC LIMIT 1", (self.store.job_id, request_key, idx, sha256)).fetchone()
            if last is not None and same_again(last, decision, reason):
                return ReviewRecord(*last)
            now = time.time()
            cur.execute("INSERT INTO reviews (job_id, request_key, idx, sha256, attempt_id, decision, reason, "
                        "decided_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s)",
                        (self.store.job_id, request_key, idx, sha256, image[1], decision, reason, now))
            return ReviewRecord(request_key, idx, sha256, image[1], decision, reason, now, None)

    def open_rejects(self) -> list[tuple[RequestRecord, list[ReviewRecord]]]:
        with self.store._tx(write=False) as cur:
            cur.execute(
                "SELECT v.request_key, v.idx, v.sha256, v.attempt_id, v.decision, v.reason, v.decided_at, v.acted_at "
                "FROM reviews v JOIN images i ON i.job_id = v.job_id AND i.request_key = v.request_key AND "
                "i.idx = v.idx AND i.sha256 = v.sha256 JOIN requests r ON r.job_id = v.job_id AND "
                f"r.key = v.request_key AND r.state = 'done' AND r.{LIVE} WHERE v.job_id = %(job)s AND "
                "v.acted_at IS NULL AND "
                f"v.decision = 'reject' AND v.{self._LATEST} ORDER BY r.seq, v.idx", self.store._a())  # type: ignore[arg-type]
            rows = cur.fetchall()
        return by_request(rows, self.store.get_request)

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
        with self.store._tx(write=False) as cur:
            cur.execute(f"SELECT request_key, idx, sha256 FROM images WHERE job_id = %(job)s AND {_LIVE_IMAGE}",
                        self.store._a())
            out = count_images(cur.fetchall(), latest)
        out["regenerating"] = int(self.store._one(
            "SELECT COUNT(DISTINCT request_key) FROM set_aside WHERE job_id = %(job)s AND why='review' AND "
            "request_key IN (SELECT key FROM requests WHERE job_id = %(job)s AND state IN "
            f"('pending', 'submitted', 'completed') AND {LIVE})", self.store._a()))
        out["set_aside"] = int(self.store._one("SELECT COUNT(*) FROM set_aside WHERE job_id = %s",
                                               (self.store.job_id,)))
        out["check_failed"] = int(self.store._one("SELECT COUNT(*) FROM images WHERE job_id = %(job)s AND "
                                                  f"check_status='failed' AND {_LIVE_IMAGE}", self.store._a()))
        return out

