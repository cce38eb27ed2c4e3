"""The run log of a SQLite store: the `runs` table (m002) of the job's file.

Apart from the store (sqlite.py) so that the store does not also keep the log of its runs; it writes
through the store's connection and its `_tx()`, so a full disk or a read-only file fails here exactly as
anywhere else in the store (a LocalFaultError, the run resumable).
"""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING, Any

from batchgen.store.records import encode_json as _j
from batchgen.store.runlog import RunLog, decoded

if TYPE_CHECKING:
    from batchgen.store.sqlite import Store


class SqliteRunLog(RunLog):
    """One row per `batchgen run` in the `runs` table."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def start(self) -> int:
        with self.store._tx() as c:
            cur = c.execute("INSERT INTO runs (started_at, pid, host) VALUES (?,?,?)",
                            (time.time(), os.getpid(), socket.gethostname()))
            return int(cur.lastrowid or 0)

    def finish(self, run_id: int, exit_code: int, reason: str, summary: dict[str, Any]) -> None:
        with self.store._tx() as c:
            c.execute("UPDATE runs SET finished_at=?, exit_code=?, reason=?, summary=? WHERE id=?",
                      (time.time(), exit_code, reason, _j(summary), run_id))

    def all(self) -> list[dict[str, Any]]:
        cur = self.store.conn.execute("SELECT * FROM runs ORDER BY id")
        names = [d[0] for d in cur.description]
        return [decoded(dict(zip(names, row, strict=True))) for row in cur.fetchall()]
