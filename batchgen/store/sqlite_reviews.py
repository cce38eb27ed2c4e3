"""The reviews ledger of the SQLite store (`store.reviews`): images set aside, decisions, rejected requests requeued.

Every SQL statement of issue 16's tables (`set_aside`, `reviews`; schema in sqlite.py's docstring) against
the store's one connection, in the store's own transactions (`Store._tx`). A failed check or a requeued
reject changes its request's state in the same transaction as its own rows, through the store's
`_requeue` and `_fail` (the request transitions live with the store, not here).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from batchgen.store.live import SQLITE_LIVE as LIVE
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
    from batchgen.store.sqlite import Store


# The images of live requests: the only ones that count in the results (live.py).
_LIVE_IMAGE = f"request_key IN (SELECT key FROM requests WHERE {LIVE})"

class SqliteReviews(ReviewLedger):
    """Issue 16's reads and writes on one SQLite job file."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def reject_image(self, aside: SetAsideRecord, *, requeue: bool, code: str, message: str) -> None:
        """A downloaded image failed its checks and is kept aside (its file already written under
        _rejected/): record it and, in the same transaction, either abandon the attempt and requeue the
        request (a new attempt) or fail the request."""
        now = time.time()
        with self.store._tx() as c:
            self._insert_aside(c, aside)
            if requeue:
                if aside.attempt_id is not None:
                    self.store._abandon(c, aside.attempt_id, code, message, now)
                self.store._requeue(c, aside.request_key, now, code, message, None, True, now)
            else:
                self.store._fail(c, aside.request_key, code, message, now)

    @staticmethod
    def _insert_aside(c: sqlite3.Connection, a: SetAsideRecord) -> None:
        c.execute("INSERT INTO set_aside (request_key, idx, attempt_id, path, sha256, bytes, width, height, format, "
                  "why, reason, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                  (a.request_key, a.idx, a.attempt_id, a.path, a.sha256, a.bytes, a.width, a.height, a.format,
                   a.why, a.reason, a.created_at))

    def set_aside_images(self) -> list[SetAsideRecord]:
        cur = self.store.conn.execute("SELECT request_key, idx, attempt_id, path, sha256, bytes, width, height, "
                                      "format, why, reason, created_at FROM set_aside ORDER BY id")
        return [SetAsideRecord(*row) for row in cur.fetchall()]

    def latest(self) -> dict[tuple[str, int, str], ReviewRecord]:
        """The latest decision on every image that has one, by (request key, idx, sha256)."""
        cur = self.store.conn.execute(
            "SELECT request_key, idx, sha256, attempt_id, decision, reason, decided_at, acted_at FROM reviews "
            "WHERE id IN (SELECT MAX(id) FROM reviews GROUP BY request_key, idx, sha256)")
        return latest_by_image(cur.fetchall())

    def decide(self, request_key: str, idx: int, sha256: str, decision: str, reason: str | None) -> ReviewRecord:
        """A person's decision on one image. Deciding the same thing again changes nothing; a decision on
        an image that is no longer the request's (regenerated, or requeued for regeneration) is refused
        with ReviewRefusedError. A later decision on the same image replaces an earlier one."""
        reason = checked_reason(decision, reason)
        with self.store._tx() as c:
            row = c.execute("SELECT i.sha256, i.attempt_id, r.state FROM images i JOIN requests r ON "
                            "r.key = i.request_key WHERE i.request_key=? AND i.idx=?", (request_key, idx)).fetchone()
            image = current_image(row, sha256)
            last = c.execute("SELECT request_key, idx, sha256, attempt_id, decision, reason, decided_at, acted_at "
                             "FROM reviews WHERE request_key=? AND idx=? AND sha256=? ORDER BY id DESC LIMIT 1",
                             (request_key, idx, sha256)).fetchone()
            if last is not None and same_again(last, decision, reason):
                return ReviewRecord(*last)
            now = time.time()
            c.execute("INSERT INTO reviews (request_key, idx, sha256, attempt_id, decision, reason, decided_at) "
                      "VALUES (?,?,?,?,?,?,?)", (request_key, idx, sha256, image[1], decision, reason, now))
            return ReviewRecord(request_key, idx, sha256, image[1], decision, reason, now, None)

    def open_rejects(self) -> list[tuple[RequestRecord, list[ReviewRecord]]]:
        """Done requests with a current image whose latest decision is a reject not yet acted on, with
        those decisions: what the next run regenerates (within max_attempts)."""
        cur = self.store.conn.execute(
            "SELECT v.request_key, v.idx, v.sha256, v.attempt_id, v.decision, v.reason, v.decided_at, v.acted_at "
            "FROM reviews v JOIN images i ON i.request_key = v.request_key AND i.idx = v.idx AND "
            "i.sha256 = v.sha256 JOIN requests r ON r.key = v.request_key AND r.state = 'done' "
            f"AND r.{LIVE} "
            "WHERE v.acted_at IS NULL AND v.decision = 'reject' AND v.id IN "
            "(SELECT MAX(id) FROM reviews GROUP BY request_key, idx, sha256) ORDER BY r.rowid, v.idx")
        return by_request(cur.fetchall(), self.store.get_request)

    def requeue_rejected(self, request_key: str, asides: Sequence[SetAsideRecord], reason: str) -> None:
        """A person rejected images of this done request: its images (files already moved under _rejected/)
        leave the results, the decisions are marked acted on, and the request is pending again."""
        now = time.time()
        with self.store._tx() as c:
            for a in asides:
                self._insert_aside(c, a)
            c.execute("DELETE FROM images WHERE request_key=?", (request_key,))
            c.execute("UPDATE reviews SET acted_at=? WHERE request_key=? AND acted_at IS NULL AND decision='reject'",
                      (now, request_key))
            self.store._requeue(c, request_key, 0.0, "review_rejected", reason, None, True, now)

    def counts(self) -> dict[str, int]:
        """Images of the results by review state, plus rejects being regenerated and images set aside."""
        out = count_images(self.store.conn.execute(f"SELECT request_key, idx, sha256 FROM images WHERE {_LIVE_IMAGE}"),
                           self.latest())
        out["regenerating"] = int(self.store.conn.execute(
            "SELECT COUNT(DISTINCT request_key) FROM set_aside WHERE why='review' AND request_key IN "
            "(SELECT key FROM requests WHERE state IN ('pending', 'submitted', 'completed') "
            f"AND {LIVE})").fetchone()[0])
        out["set_aside"] = int(self.store.conn.execute("SELECT COUNT(*) FROM set_aside").fetchone()[0])
        out["check_failed"] = int(self.store.conn.execute(
            f"SELECT COUNT(*) FROM images WHERE check_status='failed' AND {_LIVE_IMAGE}").fetchone()[0])
        return out

