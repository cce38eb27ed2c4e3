"""The run log: one row per `batchgen run` — when it ran, on which host and process, why it ended, its summary.

A concern of its own, apart from the run state the engine moves through: nothing a run decides depends on
the log, it is only written at a run's start and end and read back by `status` and the report sheet. So it
is a ledger the store holds (`store.run_log`), one implementation per backend (sqlite_runlog.py,
postgres_runlog.py), rather than three more methods on a store that already does many jobs.
"""

from __future__ import annotations

import abc
import json
from typing import Any


def decoded(run: dict[str, Any]) -> dict[str, Any]:
    """A run row as `all()` returns it: its summary decoded from the stored JSON (None while it runs)."""
    run["summary"] = json.loads(run["summary"]) if run["summary"] else None
    return run


class RunLog(abc.ABC):
    """The runs of one job, oldest first; every method commits what it changes."""

    @abc.abstractmethod
    def start(self) -> int:
        """A row for the run that starts now (time, pid, host; a shared store adds its runner id): its id."""

    @abc.abstractmethod
    def finish(self, run_id: int, exit_code: int, reason: str, summary: dict[str, Any]) -> None:
        """How run `run_id` ended: its exit code, the stop reason and its summary (stored as JSON)."""

    @abc.abstractmethod
    def all(self) -> list[dict[str, Any]]:
        """One row per `batchgen run`, newest last, its `summary` decoded (None for a run still going or killed)."""
