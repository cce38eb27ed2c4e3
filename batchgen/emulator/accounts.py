"""Accounts: which Bearer keys are accepted, and each key's credit balance.

A task reserves its price when it is created; when it ends the reservation becomes the final charge
(price × images returned) and the rest is refunded, or all of it is refunded if the task failed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(slots=True)
class Balance:
    remaining: float
    used: float = 0.0  # final charges of finished tasks
    reserved: float = 0.0  # held by tasks still running


class Accounts:
    def __init__(self, api_keys: list[str], initial_credits: float) -> None:
        self._allowed = frozenset(api_keys)
        self._initial = initial_credits
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
        if self._allowed and key not in self._allowed:
            return None
        return key

    def balance(self, key: str) -> Balance:
        found = self._balances.get(key)
        if found is None:
            found = self._balances[key] = Balance(self._initial)
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
