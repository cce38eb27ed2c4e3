"""The runners of a SQLite store (`store.runners`; interface in runners.py): the run lock, one runner per file.

A SQLite file is one job run by one `batchgen run` at a time, and the lock (`RunLock`, an `fcntl.flock` on
`<db>.lock`) is what makes it so: a second run exits 3 naming the holder. With one runner there is never
anything to take over, nobody else to count and no job-wide start apart from this run's own, so those
answers are the single-runner ones. The lock is the ledger's alone; the store only releases it on close.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from batchgen.errors import StoreLockedError
from batchgen.store.records import AttemptRecord, RequestRecord, RunnerInfo
from batchgen.store.runners import Runners

if TYPE_CHECKING:
    from batchgen.store.sqlite import Store


class SqliteRunners(Runners):
    """The only runner of a job's SQLite file: the run lock, and the single-runner answers."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock: RunLock | None = None

    def lock(self) -> None:
        """Take the run lock or raise StoreLockedError naming the holder."""
        if self._lock is None:
            lock = RunLock(self.store.path)
            lock.acquire()
            self._lock = lock

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def take_over(self, limit: int = 500) -> list[tuple[RequestRecord, AttemptRecord]]:
        return []

    def unfinished_elsewhere(self) -> int:
        return 0

    def live(self) -> list[RunnerInfo]:
        return []

    def running(self) -> tuple[bool, int | None]:
        return RunLock(self.store.path).holder()

    def elapsed_s(self) -> float:
        return 0.0


class RunLock:
    """`fcntl.flock` on `<db>.lock`: one run per database. The OS drops the lock when its holder dies
    (even by SIGKILL), so a stale lock file is simply taken over; the file's text only names the holder."""

    def __init__(self, db_path: Path) -> None:
        self.path = Path(str(db_path) + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace")
            os.close(fd)
            raise StoreLockedError(_holder_message(self.path, holder)) from None
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def holder(self) -> tuple[bool, int | None]:
        """Whether a run holds this lock, as the lock file names it, and its pid when it runs on this host
        (alive: a run elsewhere cannot be checked from here, so it counts as running). Read without taking
        the lock, so a run starting meanwhile is never refused because someone looked."""
        try:
            info = json.loads(self.path.read_text(encoding="utf-8") or "null")
            pid, host = int(info["pid"]), str(info["host"])
        except (OSError, ValueError, KeyError, TypeError):
            return False, None  # no file, or emptied by the holder's release: nobody holds it
        if host != socket.gethostname():
            return True, None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False, None  # killed: the file still names it, but the lock went with it
        except PermissionError:
            pass  # alive, run by another user
        return True, pid

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def _holder_message(path: Path, text: str) -> str:
    db = str(path)[: -len(".lock")]
    try:
        info = json.loads(text)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
        who = f"pid {info['pid']} on {info['host']}, running since {since}"
    except (ValueError, KeyError, TypeError):
        who = "another process (it is just starting)"
    return f"{db} is in use by another batchgen run ({who}); wait for it to finish or stop it, then run again"
