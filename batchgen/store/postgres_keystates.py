"""The API keys' last known states in a PostgreSQL store: the job's rows of `keys` (m006), by fingerprint.

Apart from the store (postgres.py) so that the store does not also keep the keys' states. Rows are scoped
by the store's job id, as every row of a shared database is: one key used by two jobs has a state in each.
Fingerprints only, never a key.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from batchgen.store.keystates import KeyStates, merged_usage

if TYPE_CHECKING:
    from batchgen.store.postgres import PostgresStore


class PostgresKeyStates(KeyStates):
    """Each key's last known state in this job's rows of `keys`, and its use from the job's `attempts`."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store

    def record(self, fingerprint: str, label: str | None, state: str, reason: str | None = None,
               balance: float | None = None) -> None:
        with self.store._tx(write=False) as cur:
            cur.execute(
                "INSERT INTO keys (job_id, fingerprint, label, state, reason, balance, updated_at) "
                "VALUES (%s,%s,%s,%s,%s,%s,%s) ON CONFLICT (job_id, fingerprint) DO UPDATE SET label=EXCLUDED.label, "
                "state=EXCLUDED.state, reason=EXCLUDED.reason, balance=COALESCE(EXCLUDED.balance, keys.balance), "
                "updated_at=EXCLUDED.updated_at",
                (self.store.job_id, fingerprint, label, state, reason, balance, time.time()))

    def usage(self) -> list[dict[str, Any]]:
        with self.store._tx(write=False) as cur:
            cur.execute(
                "SELECT key_fp, COUNT(*), SUM(credits_used), SUM(CASE WHEN state IN ('sending', 'running') "
                "THEN COALESCE(credits_reserved, credits_estimated, 0) END), "
                "SUM(CASE WHEN state IN ('sending', 'running') THEN 1 ELSE 0 END) FROM attempts "
                "WHERE job_id = %s AND key_fp IS NOT NULL GROUP BY key_fp", (self.store.job_id,))
            attempts = cur.fetchall()
            cur.execute("SELECT fingerprint, label, state, reason, balance FROM keys WHERE job_id = %s "
                        "ORDER BY COALESCE(label, fingerprint)", (self.store.job_id,))
            keys = cur.fetchall()
        return merged_usage(attempts, keys)
