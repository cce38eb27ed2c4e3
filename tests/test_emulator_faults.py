"""Fault injection and the rate limit, over real HTTP: injected 429/500/503 bodies and Retry-After,
dropped connections (before and after the task exists), the per-key rate limit and the stats that show
what a client did."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from batchgen.emulator import Emulator
from tests.emulator_fixtures import AUTH, EmulatorFactory

GEN = "/v1/images/generations"


async def call(emu: Emulator, method: str, path: str, body: Any = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
    async with aiohttp.ClientSession() as session, session.request(
        method, emu.base_url + path, json=body, headers=AUTH if headers is None else headers
    ) as response:
        return response.status, await response.json(), dict(response.headers)


@pytest.mark.parametrize(("status", "type_"), [(429, "rate_limit_error"), (500, "internal_server_error"),
                                               (503, "service_unavailable_error")])
@pytest.mark.parametrize("where", ["submit", "poll"])
async def test_injected_http_errors_have_the_api_body(emulator_factory: EmulatorFactory, status: int,
                                                      type_: str, where: str) -> None:
    emu = await emulator_factory(faults={where: {f"http_{status}": 1.0}, "retry_after_s": 30})
    if where == "submit":
        got, body, headers = await call(emu, "POST", GEN, {"prompt": "a cat"})
    else:
        got, body, headers = await call(emu, "GET", "/v1/tasks/task-unified-1-aaaaaaaa")
    assert got == status
    assert body["error"]["type"] == type_ and body["error"]["code"] == status
    if status in (429, 503):
        # 30 emulated seconds at the fixture's time scale of 0.01: fractional seconds.
        assert headers["Retry-After"] == "0.3"
    else:
        assert "Retry-After" not in headers
    assert emu.stats()["faults_injected"] == {f"{where}.{status}": 1}
    assert emu.stats()["tasks_created"] == 0


async def test_injected_faults_also_hit_batch_polls(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(faults={"poll": {"http_500": 1.0}})
    status, _, _ = await call(emu, "POST", "/v1/tasks/batch", {"task_ids": []})
    assert status == 500


async def test_a_dropped_submit_creates_nothing(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(faults={"submit": {"drop": 1.0}})
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await call(emu, "POST", GEN, {"prompt": "a cat"})
    stats = emu.stats()
    assert stats["dropped_connections"] == 1 and stats["tasks_created"] == 0
    assert stats["requests_by_route"]["POST /v1/images/generations"] == {"dropped": 1}


async def test_a_lost_response_is_recovered_with_the_idempotency_key(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(rules=[{"prompt": "lost", "fail_with": "drop_after", "times": 1}])
    headers = {**AUTH, "Idempotency-Key": "bg1-lost-response-a1"}
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await call(emu, "POST", GEN, {"prompt": "a lost answer"}, headers)
    assert emu.stats()["tasks_created"] == 1  # the server did the work
    status, task, response_headers = await call(emu, "POST", GEN, {"prompt": "a lost answer"}, headers)
    assert status == 200 and response_headers["Idempotency-Replayed"] == "true"
    assert [t["id"] for t in emu.tasks()] == [task["id"]]


async def test_dropped_polls(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(faults={"poll": {"drop": 1.0}})
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await call(emu, "GET", "/v1/tasks/task-unified-1-aaaaaaaa")


async def test_fault_probabilities_are_reproducible_with_a_seed(emulator_factory: EmulatorFactory) -> None:
    async def statuses(seed: int) -> list[int]:
        emu = await emulator_factory(seed=seed, faults={"submit": {"http_500": 0.5}})
        return [(await call(emu, "POST", GEN, {"prompt": f"p{i}"}))[0] for i in range(12)]

    first, second = await statuses(5), await statuses(5)
    assert first == second and set(first) == {200, 500}


# --- rate limit -----------------------------------------------------------------------------------------

async def test_over_the_rate_limit_is_429_with_retry_after(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(rate_limit=3)
    results = [await call(emu, "GET", "/v1/tasks/task-unified-1-aaaaaaaa") for _ in range(5)]
    assert [r[0] for r in results] == [404, 404, 404, 429, 429]
    _, body, headers = results[3]
    assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == 429
    assert 0 < float(headers["Retry-After"]) <= 1.0
    stats = emu.stats()
    assert stats["rate_limited"] == 2 and stats["max_requests_in_1s"] == 5


async def test_the_limit_is_per_key_and_covers_files_routes(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(rate_limit=2)
    other = {"Authorization": "Bearer second-key"}
    assert (await call(emu, "GET", "/v1/credits"))[0] == 200
    assert (await call(emu, "GET", "/api/v1/files/quota"))[0] == 200
    status, body, headers = await call(emu, "GET", "/api/v1/files/quota")
    assert status == 429 and body["success"] is False and body["code"] == 429 and "Retry-After" in headers
    assert (await call(emu, "GET", "/v1/credits", headers=other))[0] == 200
    # Emulator paths are neither limited nor counted as API requests.
    assert (await call(emu, "GET", "/_emulator/stats"))[0] == 200
    assert emu.stats()["api_requests"] == 4


async def test_a_client_within_its_rate_never_sees_a_429(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(rate_limit=20)
    async with aiohttp.ClientSession(headers=AUTH) as session:
        for _ in range(20):
            async with session.get(emu.base_url + "/v1/credits") as response:
                assert response.status == 200
            await asyncio.sleep(1 / 18)
    stats = emu.stats()
    assert stats["rate_limited"] == 0 and stats["max_requests_in_1s"] <= 20


async def test_stats_count_requests_by_route_and_status(emulator: Emulator) -> None:
    await call(emulator, "POST", GEN, {"prompt": "a cat"})
    await call(emulator, "POST", GEN, {"prompt": ""})
    await call(emulator, "GET", "/v1/credits", headers={})
    stats = emulator.stats()
    assert stats["requests_by_route"]["POST /v1/images/generations"] == {"200": 1, "400": 1}
    assert stats["requests_by_route"]["GET /v1/credits"] == {"401": 1}
    assert stats["requests_by_status"] == {"200": 1, "400": 1, "401": 1}
    for field in ("tasks_created", "tasks_completed", "tasks_failed", "polls", "batch_polls",
                  "idempotent_replays", "credits_charged", "uploads", "max_requests_in_1s", "rate_limited"):
        assert isinstance(stats[field], int | float)
    status, over_http, _ = await call(emulator, "GET", "/_emulator/stats", headers={})
    assert status == 200 and over_http["tasks_created"] == 1


@pytest.mark.parametrize(("status", "type_"), [(400, "invalid_request_error"), (401, "authentication_error"),
                                               (402, "insufficient_quota_error"), (403, "permission_error"),
                                               (404, "not_found_error"), (413, "request_too_large_error"),
                                               (429, "rate_limit_error"), (500, "internal_server_error"),
                                               (502, "upstream_error"), (503, "service_unavailable_error")])
async def test_every_http_error_of_the_contract_can_be_injected_by_a_rule(
    emulator_factory: EmulatorFactory, status: int, type_: str
) -> None:
    emu = await emulator_factory(rules=[{"prompt": "^trouble", "fail_with": status}])
    got, body, _ = await call(emu, "POST", GEN, {"prompt": "trouble ahead"})
    assert got == status
    assert body["error"]["type"] == type_ and body["error"]["code"] == status and body["error"]["message"]
