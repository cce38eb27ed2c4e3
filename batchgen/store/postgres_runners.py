"""The runners of a PostgreSQL store (`store.runners`; interface in runners.py): registration, leases, takeover.

Any number of `batchgen run`s on any number of hosts share one job; each registers in `runners` and keeps
its lease alive with a heartbeat thread, and takes over the in-flight requests of a runner whose lease
expired (the rules are in postgres.py's docstring and docs/scale-out.md). Apart from the store so that the
store does not also keep its runners: it goes through the store's pooled transactions and job scope
(`PostgresStore._tx`, `job_id`, `_a()`), builds records with the store's own helpers, and sets the store's
`runner_id`, which the store's claims (`claimed_by`) and the run log name. What "live" means
(`LIVE_RUNNERS`) is defined here and used by the store's claims as well.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from typing import TYPE_CHECKING

from psycopg.rows import dict_row

from batchgen.errors import StoreUnavailableError
from batchgen.store.records import AttemptRecord, RequestRecord, RunnerInfo
from batchgen.store.runners import Runners

if TYPE_CHECKING:
    from batchgen.store.postgres import PostgresStore

# The database's clock, so hosts need not agree on the time.
DB_NOW = "EXTRACT(EPOCH FROM clock_timestamp())::double precision"
# Runners of this job that are alive: heartbeat within their lease, not stopped.
LIVE_RUNNERS = (f"SELECT id FROM runners WHERE job_id = %(job)s AND stopped_at IS NULL "
                f"AND heartbeat_at + lease_s >= {DB_NOW}")


class PostgresRunners(Runners):
    """The runners of one job of a shared PostgreSQL database, and this process's registration among them."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self._heartbeat: threading.Thread | None = None
        self._stop_beat = threading.Event()

    def lock(self) -> None:
        """Register this process as one of the job's runners and start its heartbeat."""
        if self.store.runner_id is not None:
            return
        rid = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with self.store._tx() as cur:
            # Serialise registrations of this job, so "no other runner is live" is decided once.
            cur.execute("SELECT pg_advisory_xact_lock(hashtextextended('batchgen-runners:' || %s::text, 0))",
                        (self.store.job_id,))
            others = cur.execute(LIVE_RUNNERS.replace("%(job)s", "%s"), (self.store.job_id,)).fetchall()
            cur.execute(f"INSERT INTO runners (id, job_id, host, pid, started_at, heartbeat_at, lease_s) "
                        f"VALUES (%s, %s, %s, %s, {DB_NOW}, {DB_NOW}, %s)",
                        (rid, self.store.job_id, socket.gethostname(), os.getpid(), self.store.lease_s))
            if not others:
                cur.execute(f"UPDATE jobs SET group_started_at = {DB_NOW} WHERE id = %s", (self.store.job_id,))
        self.store.runner_id = rid
        self._stop_beat.clear()
        self._heartbeat = threading.Thread(target=self._beat, name="batchgen-heartbeat", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        interval = self.store.lease_s / 3
        while not self._stop_beat.wait(interval):
            # A missed beat (the server briefly away) is retried at the next interval; the lease is three
            # beats long, so one miss costs nothing.
            with contextlib.suppress(Exception):
                self.heartbeat()

    def heartbeat(self) -> None:
        with self.store._tx(write=False) as cur:
            cur.execute(f"UPDATE runners SET heartbeat_at = {DB_NOW} WHERE id = %s", (self.store.runner_id,))

    def unlock(self) -> None:
        """Stop the heartbeat and release this runner's requests so the others take them over at once."""
        if self.store.runner_id is None:
            return
        self._stop_beat.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        with contextlib.suppress(StoreUnavailableError), self.store._tx() as cur:
            cur.execute(f"UPDATE runners SET stopped_at = {DB_NOW} WHERE id = %s", (self.store.runner_id,))
            cur.execute("UPDATE requests SET claimed_by = NULL WHERE job_id = %s AND claimed_by = %s",
                        (self.store.job_id, self.store.runner_id))
        self.store.runner_id = None
        self._heartbeat = None

    def live(self) -> list[RunnerInfo]:
        rows = self.store._rows(
            "SELECT r.id, r.host, r.pid, r.started_at, r.heartbeat_at, (SELECT COUNT(*) FROM requests q "
            "WHERE q.job_id = r.job_id AND q.claimed_by = r.id AND q.state IN ('submitted', 'completed')) "
            f"AS claimed FROM runners r WHERE r.id IN ({LIVE_RUNNERS}) ORDER BY r.started_at", self.store._a())
        return [RunnerInfo(id=r["id"], host=r["host"], pid=r["pid"], started_at=r["started_at"],
                           heartbeat_at=r["heartbeat_at"], claimed=int(r["claimed"])) for r in rows]

    def running(self) -> tuple[bool, int | None]:
        return bool(self.live()), None  # several processes may share the job: no single pid

    def elapsed_s(self) -> float:
        row = self.store._one(f"SELECT {DB_NOW} - group_started_at FROM jobs WHERE id = %s", (self.store.job_id,))
        return max(0.0, float(row)) if row is not None else 0.0

    def take_over(self, limit: int = 500) -> list[tuple[RequestRecord, AttemptRecord]]:
        """Claim in-flight requests of runners that are not live any more, with their current attempt."""
        if self.store.runner_id is None:
            return []
        with self.store._tx() as cur:
            cur.row_factory = dict_row  # type: ignore[assignment]
            cur.execute(
                f"WITH picked AS (SELECT key FROM requests WHERE job_id = %(job)s "
                "AND state IN ('submitted', 'completed') AND claimed_by IS DISTINCT FROM %(me)s "
                f"AND (claimed_by IS NULL OR claimed_by NOT IN ({LIVE_RUNNERS})) ORDER BY seq LIMIT %(limit)s "
                "FOR UPDATE SKIP LOCKED) "
                "UPDATE requests r SET claimed_by = %(me)s FROM picked WHERE r.job_id = %(job)s "
                "AND r.key = picked.key RETURNING r.*", self.store._a(limit=limit))
            reqs = sorted((self.store._request_record(d) for d in cur.fetchall()), key=lambda r: r.seq)
            if not reqs:
                return []
            keys = [r.key for r in reqs]
            cur.execute(
                "UPDATE attempts a SET runner_id = %(me)s FROM requests r WHERE a.job_id = %(job)s "
                "AND r.job_id = %(job)s AND r.key = a.request_key AND a.attempt_no = r.attempt_no "
                "AND r.key = ANY(%(keys)s)", self.store._a(keys=keys))
            cur.execute("SELECT DISTINCT ON (request_key) * FROM attempts WHERE job_id = %(job)s "
                        "AND request_key = ANY(%(keys)s) ORDER BY request_key, attempt_no DESC",
                        self.store._a(keys=keys))
            latest = {d["request_key"]: self.store._attempt_record(d) for d in cur.fetchall()}
        return [(r, latest[r.key]) for r in reqs if r.key in latest]

    def unfinished_elsewhere(self) -> int:
        """Unfinished requests (pending or in flight) that other runners hold, or that no runner holds: a
        runner with nothing left of its own stays while this is not 0, to take them over if their runner
        dies. Its own (tasks it left past max_wait) do not count, or two runners could wait on each other."""
        return int(self.store._one("SELECT COUNT(*) FROM requests WHERE job_id = %(job)s "
                                   "AND state IN ('pending', 'submitted', 'completed') "
                                   "AND claimed_by IS DISTINCT FROM %(me)s", self.store._a()))
