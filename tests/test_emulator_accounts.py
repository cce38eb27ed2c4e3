"""Several keys as separate accounts (issue 15): each with its own rate limit, balance and tasks, a key that
is revoked after N tasks or on demand, and per-account stats that never name a key."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from batchgen.emulator import Emulator, EmulatorConfig
from batchgen.errors import ConfigError
from tests.emulator_fixtures import EmulatorFactory

GEN = "/v1/images/generations"
KEY_A, KEY_B = "sk-evo-account-a-0001", "sk-evo-account-b-0002"


def acct(key: str) -> str:
    return "u" + hashlib.sha256(key.encode()).hexdigest()[:12]


async def call(emu: Emulator, key: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.request(
        method, emu.base_url + path, json=body, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        return response.status, await response.json(content_type=None)


async def test_each_account_has_its_own_balance_and_rate_limit(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(rate_limit=100, accounts=[
        {"api_key": KEY_A, "rate_limit": 2, "credits": 7.5}, {"api_key": KEY_B}])
    statuses_a = [(await call(emu, KEY_A, "GET", "/v1/credits"))[0] for _ in range(4)]
    statuses_b = [(await call(emu, KEY_B, "GET", "/v1/credits"))[0] for _ in range(4)]
    assert statuses_a == [200, 200, 429, 429]  # its own 2/s
    assert statuses_b == [200] * 4  # the emulator-wide 100/s
    _, body = await call(emu, KEY_B, "GET", "/v1/credits")
    assert body["data"]["user"]["remaining_credits"] == 1_000_000
    stats = emu.stats()["accounts"]
    assert stats[acct(KEY_A)]["max_requests_in_1s"] == 4 and stats[acct(KEY_A)]["rate_limited"] == 2
    assert stats[acct(KEY_B)]["rate_limited"] == 0
    assert KEY_A not in repr(emu.stats()) and KEY_B not in repr(emu.stats())


async def test_a_starting_balance_runs_out_with_402(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(accounts=[{"api_key": KEY_A, "credits": 1.5}])
    body = {"prompt": "a lamp", "model": "z-image-turbo"}  # 0.5 credits a task
    statuses = [(await call(emu, KEY_A, "POST", GEN, body))[0] for _ in range(4)]
    assert statuses[:3] == [200, 200, 200] and statuses[3] == 402
    assert (await call(emu, KEY_B, "POST", GEN, body))[0] == 200  # another account is untouched


async def test_revoked_after_n_tasks_and_on_demand(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(accounts=[{"api_key": KEY_A, "revoke_after_submits": 2}])
    ok = [(await call(emu, KEY_A, "POST", GEN, {"prompt": f"p{i}"})) for i in range(2)]
    assert [s for s, _ in ok] == [200, 200]
    assert (await call(emu, KEY_A, "POST", GEN, {"prompt": "p3"}))[0] == 401
    assert (await call(emu, KEY_A, "GET", f"/v1/tasks/{ok[0][1]['id']}"))[0] == 401  # no polls either
    assert (await call(emu, KEY_B, "GET", "/v1/credits"))[0] == 200
    emu.revoke(KEY_B)
    assert (await call(emu, KEY_B, "GET", "/v1/credits"))[0] == 401
    assert emu.stats()["accounts"][acct(KEY_A)]["tasks_created"] == 2


async def test_tasks_and_files_belong_to_their_account(emulator: Emulator) -> None:
    status, task = await call(emulator, KEY_A, "POST", GEN, {"prompt": "a chair"})
    assert status == 200
    assert (await call(emulator, KEY_B, "GET", f"/v1/tasks/{task['id']}"))[0] == 404
    _, batch = await call(emulator, KEY_B, "POST", "/v1/tasks/batch", {"task_ids": [task["id"]]})
    assert batch["data"] == []
    _, listing_b = await call(emulator, KEY_B, "GET", "/api/v1/files/list")
    _, listing_a = await call(emulator, KEY_A, "GET", "/api/v1/files/list")
    assert listing_a["data"]["total"] == listing_b["data"]["total"] == 0


def test_accounts_in_a_scenario_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("accounts:\n  - api_key: k1\n    rate_limit: 3\n  - api_key: k2\n    credits: -1\n")
    with pytest.raises(ConfigError) as caught:
        EmulatorConfig.from_options(scenario_path=path)
    assert "accounts.1.credits" in str(caught.value)
    path.write_text("api_keys: [k0]\naccounts:\n  - {api_key: k1, rate_limit: 3}\n")
    config = EmulatorConfig.from_options(scenario_path=path)
    assert config.accounts[0].rate_limit == 3


async def test_revoke_over_http(emulator: Emulator) -> None:
    assert (await call(emulator, KEY_A, "GET", "/v1/credits"))[0] == 200
    status, body = await call(emulator, KEY_B, "POST", "/_emulator/revoke", {"api_key": KEY_A})
    assert status == 200 and body == {"ok": True}
    assert (await call(emulator, KEY_A, "GET", "/v1/credits"))[0] == 401
    assert (await call(emulator, KEY_A, "GET", "/api/v1/files/quota"))[0] == 401
