"""The API keys' last known states in a SQLite store: the `keys` table (m006), by fingerprint, never a key.

Apart from the store (sqlite.py) so that the store does not also keep the keys' states; it writes through
the store's connection and its `_tx()`, and reads what was sent with each key from the store's `attempts`
(their `key_fp`, also m006).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from batchgen.store.keystates import KeyStates, merged_usage

if TYPE_CHECKING:
    from batchgen.store.sqlite import Store


class SqliteKeyStates(KeyStates):
    """Each key's last known state in the `keys` table, and its use from `attempts`."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def record(self, fingerprint: str, label: str | None, state: str, reason: str | None = None,
               balance: float | None = None) -> None:
        """A key's state as this run last saw it (for `status`); the balance is kept when None."""
        with self.store._tx() as c:
            c.execute(
                "INSERT INTO keys (fingerprint, label, state, reason, balance, updated_at) VALUES (?,?,?,?,?,?) "
                "ON CONFLICT(fingerprint) DO UPDATE SET label=excluded.label, state=excluded.state, "
                "reason=excluded.reason, balance=COALESCE(excluded.balance, balance), updated_at=excluded.updated_at",
                (fingerprint, label, state, reason, balance, time.time()))

    def usage(self) -> list[dict[str, Any]]:
        """Per key fingerprint: label, state, reason, balance, requests (attempts sent with it), credits (used
        by its finished tasks and reserved by those in flight), open (attempts still in flight). Keys seen on
        attempts but never recorded (a store from before m006 has none) appear with state "unknown"."""
        conn = self.store.conn
        return merged_usage(
            conn.execute("SELECT key_fp, COUNT(*), SUM(credits_used), SUM(CASE WHEN state IN ('sending', 'running') "
                         "THEN COALESCE(credits_reserved, credits_estimated, 0) END), "
                         "SUM(state IN ('sending', 'running')) FROM attempts WHERE key_fp IS NOT NULL "
                         "GROUP BY key_fp").fetchall(),
            conn.execute("SELECT fingerprint, label, state, reason, balance FROM keys "
                         "ORDER BY COALESCE(label, fingerprint)").fetchall())
