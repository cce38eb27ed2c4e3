"""Each API key's last known state, by fingerprint (issue 15): fingerprints only, never a key.

A run with several keys takes a revoked or empty one out of its pool; `status` then shows, per key, what
the run last saw of it and what was sent with it. That is a concern of its own, so the store holds it as
a ledger (`store.key_states`), one implementation per backend (sqlite_keystates.py,
postgres_keystates.py), instead of two more methods on a store that already does many jobs.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from typing import Any


def merged_usage(attempts: Iterable[Sequence[Any]], keys: Iterable[Sequence[Any]]) -> list[dict[str, Any]]:
    """`usage()`'s rows from the two reads every backend makes: per key fingerprint, its attempts (fingerprint,
    count, credits used, credits reserved in flight, open attempts) and its recorded state (fingerprint,
    label, state, reason, balance; in display order). Fingerprints seen only on attempts come last, as
    "unknown"."""
    usage = {fp: {"requests": int(n), "credits_used": float(used or 0.0), "credits_reserved": float(res or 0.0),
                  "open": int(open_ or 0)} for fp, n, used, res, open_ in attempts}
    out = []
    for fp, label, state, reason, balance in keys:
        u = usage.pop(fp, {"requests": 0, "credits_used": 0.0, "credits_reserved": 0.0, "open": 0})
        out.append({"fingerprint": fp, "label": label, "state": state, "reason": reason, "balance": balance, **u})
    for fp, u in sorted(usage.items()):
        out.append({"fingerprint": fp, "label": None, "state": "unknown", "reason": None, "balance": None, **u})
    return out


class KeyStates(abc.ABC):
    """The keys of one job as its runs last saw them, by fingerprint; every method commits what it changes."""

    @abc.abstractmethod
    def record(self, fingerprint: str, label: str | None, state: str, reason: str | None = None,
               balance: float | None = None) -> None:
        """A key's state as this run last saw it (for `status`); the balance is kept when None."""

    @abc.abstractmethod
    def usage(self) -> list[dict[str, Any]]:
        """Per key fingerprint: label, state, reason, balance, requests, credits used/reserved, open."""
