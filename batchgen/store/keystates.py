"""Each API key's last known state, by fingerprint (issue 15): fingerprints only, never a key.

A run with several keys takes a revoked or empty one out of its pool; `status` then shows, per key, what
the run last saw of it and what was sent with it. That is a concern of its own, so the store holds it as
a ledger (`store.key_states`), one implementation per backend (sqlite_keystates.py,
postgres_keystates.py), instead of two more methods on a store that already does many jobs.
"""

from __future__ import annotations

import abc
from typing import Any


class KeyStates(abc.ABC):
    """The keys of one job as its runs last saw them, by fingerprint; every method commits what it changes."""

    @abc.abstractmethod
    def record(self, fingerprint: str, label: str | None, state: str, reason: str | None = None,
               balance: float | None = None) -> None:
        """A key's state as this run last saw it (for `status`); the balance is kept when None."""

    @abc.abstractmethod
    def usage(self) -> list[dict[str, Any]]:
        """Per key fingerprint: label, state, reason, balance, requests, credits used/reserved, open."""
