"""The run log of a PostgreSQL store: the job's rows of the shared `runs` table (m002).

Apart from the store (postgres.py) so that the store does not also keep the log of its runs. Every row is
scoped by the store's job id, as every row of a shared database is; a run's row names the runner that
`runners.lock()` registered (the store's `runner_id`, None before it), which stays the store's business.
"""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING, Any

from batchgen.store.records import encode_json as _j
from batchgen.store.runlog import RunLog, decoded

if TYPE_CHECKING:
    from batchgen.store.postgres import PostgresStore


class PostgresRunLog(RunLog):
    """One row per `batchgen run` of this job in the `runs` table."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store

    def start(self) -> int:
        with self.store._tx() as cur:
            cur.execute("INSERT INTO runs (job_id, started_at, pid, host, runner_id) VALUES (%s,%s,%s,%s,%s) "
                        "RETURNING id", (self.store.job_id, time.time(), os.getpid(), socket.gethostname(),
                                         self.store.runner_id))
            row = cur.fetchone()
            return int(row[0]) if row else 0

    def finish(self, run_id: int, exit_code: int, reason: str, summary: dict[str, Any]) -> None:
        with self.store._tx(write=False) as cur:
            cur.execute("UPDATE runs SET finished_at=%s, exit_code=%s, reason=%s, summary=%s "
                        "WHERE id=%s AND job_id=%s", (time.time(), exit_code, reason, _j(summary), run_id,
                                                      self.store.job_id))

    def all(self) -> list[dict[str, Any]]:
        return [decoded(rec) for rec in self.store._rows(
            "SELECT id, started_at, finished_at, pid, host, exit_code, reason, summary FROM runs WHERE job_id = %s "
            "ORDER BY id", (self.store.job_id,))]
