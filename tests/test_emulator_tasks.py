"""Contract tests of the task side: GET /v1/tasks/{id} through every state, every task error code, batch
polls, credits, result images and their 24-hour expiry (in well under a second, with the time scale)."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import aiohttp
import pytest
from PIL import Image

from batchgen import catalog
from batchgen.emulator import Emulator
from batchgen.emulator.faults import TASK_ERROR_CODES
from batchgen.emulator.tasks import TASK_ERROR_MESSAGES
from tests.emulator_fixtures import AUTH, EmulatorFactory

GEN = "/v1/images/generations"
INITIAL = 1000.0


async def call(emu: Emulator, method: str, path: str, body: Any = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.request(
        method, emu.base_url + path, json=body, headers=AUTH if headers is None else headers
    ) as response:
        return response.status, await response.json()


async def submit(emu: Emulator, **body: Any) -> dict[str, Any]:
    status, task = await call(emu, "POST", GEN, {"prompt": "a red bicycle", **body})
    assert status == 200, task
    return task


async def wait_final(emu: Emulator, task_id: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """Poll until the task is final; returns every distinct state seen, last one final."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        status, task = await call(emu, "GET", f"/v1/tasks/{task_id}")
        assert status == 200
        if task["status"] in ("completed", "failed", "cancelled"):
            return task
        assert loop.time() < deadline, f"task still {task['status']}"
        await asyncio.sleep(0.01)


async def credits(emu: Emulator) -> dict[str, Any]:
    status, body = await call(emu, "GET", "/v1/credits")
    assert status == 200
    return body


def assert_running_fields(task: dict[str, Any]) -> None:
    assert task["status"] in ("pending", "processing")
    assert isinstance(task["progress"], int) and 0 <= task["progress"] <= 99
    assert task["task_info"]["can_cancel"] is True
    assert isinstance(task["task_info"]["estimated_time"], int | float)
    assert isinstance(task["usage"]["credits_reserved"], int | float)
    assert "results" not in task and "result_data" not in task and "error" not in task


async def test_a_task_walks_pending_processing_completed(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(latency_s=30.0)  # 0.3 s real at the fixture's time scale
    task = await submit(emu, model=catalog.NANO_BANANA_2)
    seen: list[dict[str, Any]] = []
    for _ in range(500):
        _, polled = await call(emu, "GET", f"/v1/tasks/{task['id']}")
        seen.append(polled)
        if polled["status"] == "completed":
            break
        await asyncio.sleep(0.01)
    statuses = [t["status"] for t in seen]
    assert statuses[0] == "pending" and "processing" in statuses and statuses[-1] == "completed"
    running = [t for t in seen if t["status"] != "completed"]
    for t in running:
        assert_running_fields(t)
    progress = [t["progress"] for t in running]
    remaining = [t["task_info"]["estimated_time"] for t in running]
    assert progress == sorted(progress) and remaining == sorted(remaining, reverse=True)
    done = seen[-1]
    assert done["progress"] == 100 and done["task_info"] == {"can_cancel": False}
    assert isinstance(done["results"], list) and len(done["results"]) == 1
    assert all(isinstance(u, str) and u.startswith("http") for u in done["results"])
    assert [d["image_url"] for d in done["result_data"]] == done["results"]
    assert done["usage"]["credits_used"] == catalog.MODELS[catalog.NANO_BANANA_2].credits_per_image
    assert "error" not in done


async def test_latency_follows_the_model_distribution(emulator: Emulator) -> None:
    task = await submit(emulator, model="z-image-turbo")
    info = catalog.MODELS["z-image-turbo"]
    eta_s = task["task_info"]["estimated_time"] / emulator.config.time_scale
    assert info.latency_min_s - 0.01 <= eta_s <= info.latency_max_s + 0.01


async def test_completed_tasks_charge_and_count(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(latency_s=1.0, initial_credits=INITIAL)
    task = await submit(emu, model="gpt-image-1", n=3)
    reserved = catalog.MODELS["gpt-image-1"].credits_for(3)
    assert (await credits(emu))["data"]["user"]["remaining_credits"] == INITIAL - reserved
    done = await wait_final(emu, task["id"])
    assert len(done["results"]) == 3
    body = await credits(emu)
    assert body["success"] is True
    for part in ("user", "token"):
        assert body["data"][part]["remaining_credits"] == INITIAL - reserved
        assert body["data"][part]["used_credits"] == reserved
    assert body["data"]["token"]["unlimited_credits"] is False
    stats = emu.stats()
    assert stats["tasks_created"] == 1 and stats["tasks_completed"] == 1 and stats["credits_charged"] == reserved


async def test_tasks_that_nobody_polls_are_settled_too(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(latency_s=0.5)
    for _ in range(3):
        await submit(emu)
    await asyncio.sleep(0.05)
    assert emu.stats()["tasks_completed"] == 3


async def test_latency_zero_completes_on_submit(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(latency_s=0.0)
    task = await submit(emu)
    assert task["status"] == "completed" and task["results"]


@pytest.mark.parametrize("code", TASK_ERROR_CODES)
async def test_every_task_error_code_has_the_documented_body_and_is_refunded(
    emulator_factory: EmulatorFactory, code: str
) -> None:
    emu = await emulator_factory(latency_s=1.0, initial_credits=INITIAL,
                                 rules=[{"prompt": "^doomed", "fail_with": code}])
    task = await submit(emu, prompt="doomed prompt", n=2)
    final = await wait_final(emu, task["id"])
    expected = "cancelled" if code == "request_cancelled" else "failed"
    assert final["status"] == expected
    assert final["error"] == {"code": code, "message": TASK_ERROR_MESSAGES[code]}
    assert isinstance(final["progress"], int)
    assert final["usage"]["credits_used"] == 0
    assert "results" not in final and final["task_info"]["can_cancel"] is False
    assert (await credits(emu))["data"]["user"]["remaining_credits"] == INITIAL
    stats = emu.stats()
    assert stats["tasks_failed"] + stats["tasks_cancelled"] == 1


async def test_task_error_probabilities(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(latency_s=0.0, faults={"tasks": {"errors": {"upstream_error": 1.0}}})
    task = await submit(emu)
    assert task["status"] == "failed" and task["error"]["code"] == "upstream_error"
    assert emu.stats()["task_errors"] == {"upstream_error": 1}


async def test_a_rule_fails_the_first_k_attempts_then_succeeds(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(latency_s=0.0, rules=[{"prompt": "flaky", "fail_with": "generation_timeout",
                                                        "times": 2}])
    outcomes = [(await submit(emu, prompt="a flaky lamp"))["status"] for _ in range(3)]
    assert outcomes == ["failed", "failed", "completed"]
    assert (await submit(emu, prompt="a steady lamp"))["status"] == "completed"


async def test_a_rule_can_answer_an_http_status(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(rules=[{"prompt": "busy", "fail_with": 503, "times": 1}])
    status, body = await call(emu, "POST", GEN, {"prompt": "busy day"})
    assert status == 503 and body["error"]["type"] == "service_unavailable_error"
    status, _ = await call(emu, "POST", GEN, {"prompt": "busy day"})
    assert status == 200


async def test_stalled_tasks_never_finish(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(latency_s=1.0, rules=[{"prompt": "stuck", "fail_with": "stall"}])
    task = await submit(emu, prompt="stuck forever")
    emu.advance(3600)
    _, polled = await call(emu, "GET", f"/v1/tasks/{task['id']}")
    assert_running_fields(polled)
    assert polled["status"] == "processing"


async def test_slow_tasks_take_longer(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(latency_s=10.0, faults={"tasks": {"slow": 1.0, "slow_factor": 4.0}})
    task = await submit(emu)
    assert task["task_info"]["estimated_time"] == pytest.approx(40.0 * emu.config.time_scale, abs=0.01)


async def test_cancelling_a_task_through_the_emulator(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(latency_s=100.0)
    task = await submit(emu)
    status, body = await call(emu, "POST", f"/_emulator/tasks/{task['id']}/cancel")
    assert status == 200 and body == {"cancelled": True}
    _, polled = await call(emu, "GET", f"/v1/tasks/{task['id']}")
    assert polled["status"] == "cancelled" and polled["error"]["code"] == "request_cancelled"


async def test_partial_results_for_n_above_one(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(latency_s=0.0, partial_results_share=1.0)
    task = await submit(emu, model="gpt-image-1.5", n=4)
    assert 1 <= len(task["results"]) < 4
    price = catalog.MODELS["gpt-image-1.5"].credits_per_image
    assert task["usage"]["credits_used"] == price * len(task["results"])
    assert task["usage"]["credits_reserved"] == price * 4


async def test_unknown_and_malformed_ids(emulator: Emulator) -> None:
    status, body = await call(emulator, "GET", "/v1/tasks/task-unified-1757156493-zzzzzzzz")
    assert status == 404
    assert body == {"error": {"code": "task_not_found", "message": "Task not found.", "type": "not_found_error"}}
    status, body = await call(emulator, "GET", "/v1/tasks/12345")
    assert status == 400
    assert body["error"]["code"] == "invalid_task_id" and body["error"]["type"] == "invalid_request_error"


async def test_another_keys_task_is_not_found(emulator: Emulator) -> None:
    task = await submit(emulator)
    status, _ = await call(emulator, "GET", f"/v1/tasks/{task['id']}", headers={"Authorization": "Bearer other"})
    assert status == 404


async def test_same_seed_same_fates(emulator_factory: EmulatorFactory) -> None:
    first = await emulator_factory(seed=99)
    second = await emulator_factory(seed=99)
    a = [await submit(first, prompt=f"p{i}") for i in range(3)]
    b = [await submit(second, prompt=f"p{i}") for i in reversed(range(3))]
    assert [t["task_info"]["estimated_time"] for t in a] == [t["task_info"]["estimated_time"] for t in reversed(b)]


# --- batch polls ----------------------------------------------------------------------------------------

async def test_batch_poll_returns_known_tasks_and_omits_the_rest(emulator: Emulator) -> None:
    ids = [(await submit(emulator, prompt=f"item {i}"))["id"] for i in range(3)]
    status, body = await call(emulator, "POST", "/v1/tasks/batch",
                              {"task_ids": [*ids, "task-unified-1-unknown0", "not-a-task"]})
    assert status == 200
    assert [t["id"] for t in body["data"]] == ids
    for task in body["data"]:
        assert task["object"] == "image.generation.task"
    stats = emulator.stats()
    assert stats["batch_polls"] == 1 and stats["polls"] == 5


async def test_batch_poll_takes_at_most_fifty_ids(emulator: Emulator) -> None:
    status, _ = await call(emulator, "POST", "/v1/tasks/batch", {"task_ids": ["task-unified-1-aaaaaaaa"] * 50})
    assert status == 200
    status, body = await call(emulator, "POST", "/v1/tasks/batch", {"task_ids": ["task-unified-1-aaaaaaaa"] * 51})
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = await call(emulator, "POST", "/v1/tasks/batch", {"ids": []})
    assert status == 400


@pytest.mark.parametrize(("feature", "method", "path"), [("batch_poll", "POST", "/v1/tasks/batch"),
                                                         ("credits_endpoint", "GET", "/v1/credits")])
async def test_newer_gateway_routes_can_be_switched_off(emulator_factory: EmulatorFactory, feature: str,
                                                        method: str, path: str) -> None:
    emu = await emulator_factory(**{feature: False})
    status, body = await call(emu, method, path, {"task_ids": []})
    assert status == 404 and body["error"]["type"] == "not_found_error"


# --- result images --------------------------------------------------------------------------------------

async def download(url: str) -> tuple[int, bytes, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.read(), response.headers.get("Content-Type", "")


@pytest.mark.parametrize(("size", "ratio"), [("1:1", 1.0), ("16:9", 16 / 9), ("9:16", 9 / 16), ("21:9", 21 / 9),
                                             ("1024x1536", 1024 / 1536), (None, 1.0)])
async def test_results_are_pngs_with_the_requested_aspect_ratio(emulator_factory: EmulatorFactory,
                                                                size: str | None, ratio: float) -> None:
    emu = await emulator_factory(latency_s=0.0)
    task = await submit(emu, size=size, n=2) if size else await submit(emu, n=2)
    images = []
    for url in task["results"]:
        status, data, content_type = await download(url)  # no Authorization header
        assert status == 200 and content_type == "image/png" and data.startswith(b"\x89PNG")
        image = Image.open(io.BytesIO(data))
        assert min(image.size) == 64
        assert image.size[0] / image.size[1] == pytest.approx(ratio, rel=0.03)
        images.append(data)
    assert images[0] != images[1]
    assert emu.stats()["downloads"] == 2


async def test_result_images_are_deterministic_from_the_prompt(emulator_factory: EmulatorFactory) -> None:
    # The first image of a prompt is the same on every emulator; a later task with the same prompt (a
    # regeneration, issue 16) draws a different one, as a real model would.
    emu = await emulator_factory(latency_s=0.0)
    one, two, other = [await submit(emu, prompt=p) for p in ("a fox", "a fox", "a wolf")]
    data = [(await download(t["results"][0]))[1] for t in (one, two, other)]
    assert len({data[0], data[1], data[2]}) == 3
    fresh = await emulator_factory(latency_s=0.0)
    assert (await download((await submit(fresh, prompt="a fox"))["results"][0]))[1] == data[0]


async def test_a_new_attempt_draws_a_new_picture_even_on_a_fresh_emulator(emulator_factory: EmulatorFactory) -> None:
    # `batchgen run --emulator` starts a fresh emulator every run: a request regenerated after a reject
    # (a new attempt, so a new idempotency key) must not get the rejected picture back.
    async def first_image(emu: Emulator, key: str) -> bytes:
        status, task = await call(emu, "POST", GEN, {"prompt": "a fox"}, headers={**AUTH, "Idempotency-Key": key})
        assert status == 200, task
        return (await download(task["results"][0]))[1]

    attempt1 = await first_image(await emulator_factory(latency_s=0.0), "bg1-store0001-v1-fox-a1")
    fresh = await emulator_factory(latency_s=0.0)
    assert await first_image(fresh, "bg1-store0001-v1-fox-a2") != attempt1
    assert await first_image(await emulator_factory(latency_s=0.0), "bg1-store0001-v1-fox-a1") == attempt1


async def test_result_urls_expire_24_emulated_hours_after_completion(emulator_factory: EmulatorFactory) -> None:
    # 24 emulated hours last 0.864 real seconds at this scale.
    emu = await emulator_factory(time_scale=1e-5, latency_s=0.0)
    url = (await submit(emu))["results"][0]
    assert (await download(url))[0] == 200
    await asyncio.sleep(24 * 3600 * 1e-5 + 0.05)
    status, _, _ = await download(url)
    assert status == 404


async def test_downloads_need_no_key_and_skip_the_rate_limit(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(latency_s=0.0, rate_limit=1)
    url = (await submit(emu))["results"][0]
    for _ in range(5):
        assert (await download(url))[0] == 200
    assert emu.stats()["rate_limited"] == 0


async def test_estimated_time_can_be_switched_off(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(estimated_time=False, latency_s=100.0)
    task = await submit(emu)
    assert task["task_info"] == {"can_cancel": True}
