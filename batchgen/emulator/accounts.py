"""Accounts: which Bearer keys are accepted, and each key's credit balance.

Every key is its own account (its own balance, files and tasks; the scenario's `accounts` list gives a key
its own starting balance, rate limit or a revocation after N tasks). A revoked key is refused with 401 on
every route, like a key deleted from the dashboard.

A task reserves its price when it is created; when it ends the reservation becomes the final charge
(price × images returned) and the rest is refunded, or all of it is refunded if the task failed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batchgen.emulator.config import AccountConfig


@dataclass(slots=True)
class Balance:
    remaining: float
    used: float = 0.0  # final charges of finished tasks
    reserved: float = 0.0  # held by tasks still running


class Accounts:
    def __init__(self, api_keys: list[str], initial_credits: float, accounts: Sequence[AccountConfig] = ()) -> None:
        # Keys named in `accounts` are accepted too, but only narrow an open emulator when api_keys is set.
        self._allowed = frozenset([*api_keys, *(a.api_key for a in accounts)]) if api_keys else frozenset()
        self._initial = initial_credits
        self._starting = {a.api_key: a.credits for a in accounts if a.credits is not None}
        self._revoke_after = {a.api_key: a.revoke_after_submits for a in accounts
                              if a.revoke_after_submits is not None}
        self._created: dict[str, int] = {}
        self._revoked: set[str] = set()
        self._balances: dict[str, Balance] = {}
        self._ids: dict[str, str] = {}

    def authenticate(self, header: str | None) -> str | None:
        """The key from an `Authorization: Bearer <key>` header, or None if it is not accepted."""
        if not header:
            return None
        scheme, _, key = header.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return None
        if (self._allowed and key not in self._allowed) or key in self._revoked:
            return None
        return key

    def revoke(self, key: str) -> None:
        """From now on every call with this key is 401 (tasks and files stay, unreachable by it)."""
        self._revoked.add(key)

    def task_created(self, key: str) -> None:
        """Count a key's tasks; a key with `revoke_after_submits` is revoked when it reaches that many."""
        created = self._created[key] = self._created.get(key, 0) + 1
        limit = self._revoke_after.get(key)
        if limit is not None and created >= limit:
            self.revoke(key)

    def balance(self, key: str) -> Balance:
        found = self._balances.get(key)
        if found is None:
            found = self._balances[key] = Balance(self._starting.get(key, self._initial))
        return found

    def set_credits(self, key: str, remaining: float) -> None:
        self.balance(key).remaining = remaining

    def reserve(self, key: str, amount: float) -> bool:
        balance = self.balance(key)
        if balance.remaining + 1e-9 < amount:
            return False
        balance.remaining -= amount
        balance.reserved += amount
        return True

    def settle(self, key: str, reserved: float, used: float) -> None:
        balance = self.balance(key)
        balance.reserved -= reserved
        balance.used += used
        balance.remaining += reserved - used

    def account_id(self, key: str) -> str:
        """A stable, key-free account id for URLs (never put a key in a URL)."""
        found = self._ids.get(key)
        if found is None:
            found = self._ids[key] = "u" + hashlib.sha256(key.encode()).hexdigest()[:12]
        return found
