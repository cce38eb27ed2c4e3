"""Contract tests of POST /v1/images/generations, written from the reference and API_CONTRACT.md:
the task object on success, every validation rule's 400, 401, 402, 413, and Idempotency-Key."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import pytest

from batchgen import catalog
from batchgen.emulator import Emulator
from tests.emulator_fixtures import AUTH, EmulatorFactory

GEN = "/v1/images/generations"
TASK_ID_RE = re.compile(r"^task-unified-\d+-[a-z0-9]{8}$")


async def post(emu: Emulator, body: Any, headers: dict[str, str] | None = None,
               path: str = GEN) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    async with aiohttp.ClientSession() as session, session.post(
        emu.base_url + path, json=body, headers=AUTH if headers is None else headers
    ) as response:
        return response.status, await response.json(), response


def assert_error(body: dict[str, Any], type_: str, code: Any = None, param: str | None = None) -> None:
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["code"], int | str)
    assert error["type"] == type_
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param


async def test_submit_answers_a_pending_task_object(emulator: Emulator) -> None:
    status, task, response = await post(emulator, {"prompt": "a red bicycle", "model": catalog.NANO_BANANA_2,
                                                   "n": 2, "size": "16:9"})
    assert status == 200
    assert TASK_ID_RE.match(task["id"])
    assert task["object"] == "image.generation.task" and task["type"] == "image"
    assert task["model"] == catalog.NANO_BANANA_2
    assert task["status"] == "pending" and task["progress"] == 0
    assert isinstance(task["created"], int)
    assert task["task_info"]["can_cancel"] is True
    assert isinstance(task["task_info"]["estimated_time"], int | float) and task["task_info"]["estimated_time"] > 0
    assert task["usage"]["credits_reserved"] == catalog.MODELS[catalog.NANO_BANANA_2].credits_for(2)
    assert task["usage"]["billing_rule"] == "per_call" and task["usage"]["user_group"] == "default"
    assert "results" not in task and "error" not in task
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["X-Request-Id"]


async def test_responses_are_compact_json(emulator: Emulator) -> None:
    async with aiohttp.ClientSession() as session, session.post(
        emulator.base_url + GEN, json={"prompt": "a cat"}, headers=AUTH
    ) as response:
        text = await response.text()
    assert '"id":"task-unified-' in text and ", " not in text and '": ' not in text


async def test_default_model_and_unknown_fields_ignored(emulator: Emulator) -> None:
    status, task, _ = await post(emulator, {"prompt": "a cat", "style": "whatever", "callback_url": "x"})
    assert status == 200
    assert task["model"] == catalog.DEFAULT_MODEL


async def test_estimated_time_is_whole_seconds_without_time_scale(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(time_scale=1.0)
    status, task, _ = await post(emu, {"prompt": "a cat", "model": "z-image-turbo"})
    assert status == 200 and isinstance(task["task_info"]["estimated_time"], int)


@pytest.mark.parametrize(("body", "param"), [
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * (catalog.MAX_PROMPT_CHARS + 1)}, "prompt"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": "a cat", "model": "dall-e-9"}, "model"),
    ({"prompt": "a cat", "size": "7:3"}, "size"),
    ({"prompt": "a cat", "model": "z-image-turbo", "size": "1024x1024"}, "size"),
    ({"prompt": "a cat", "n": 0}, "n"),
    ({"prompt": "a cat", "n": 5}, "n"),
    ({"prompt": "a cat", "image_urls": [f"https://example.com/{i}.png" for i in range(15)]}, "image_urls"),
    ({"prompt": "a cat", "mask_url": "https://example.com/m.png"}, "mask_url"),
    ({"prompt": "a cat", "model": "qwen-image-edit"}, "image_urls"),
])
async def test_invalid_requests_get_400_naming_the_parameter(emulator: Emulator, body: dict[str, Any],
                                                             param: str) -> None:
    status, answer, _ = await post(emulator, body)
    assert status == 400
    assert_error(answer, "invalid_request_error", param=param)
    assert emulator.stats()["tasks_created"] == 0


async def test_allowed_edges_are_accepted(emulator: Emulator) -> None:
    for body in (
        {"prompt": "x" * catalog.MAX_PROMPT_CHARS},
        {"prompt": "a cat", "n": 4},
        {"prompt": "a cat", "size": "1536x1024"},
        {"prompt": "a cat", "image_urls": [f"https://example.com/{i}.png" for i in range(14)]},
        {"prompt": "a cat", "model": "gpt-4o-image", "mask_url": "https://example.com/m.png"},
    ):
        status, answer, _ = await post(emulator, body)
        assert status == 200, answer


async def test_unknown_model_error_suggests_a_fallback(emulator: Emulator) -> None:
    _, answer, _ = await post(emulator, {"prompt": "a cat", "model": "dall-e-9"})
    assert answer["error"]["fallback_suggestion"] in catalog.MODELS


async def test_malformed_json_is_400(emulator: Emulator) -> None:
    async with aiohttp.ClientSession() as session, session.post(
        emulator.base_url + GEN, data=b"{not json", headers={**AUTH, "Content-Type": "application/json"}
    ) as response:
        assert response.status == 400
        assert_error(await response.json(), "invalid_request_error")


async def test_oversized_body_is_413(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(max_request_bytes=2048)
    status, answer, _ = await post(emu, {"prompt": "x" * 4000})
    assert status == 413
    assert_error(answer, "request_too_large_error", code=413)


@pytest.mark.parametrize("headers", [{}, {"Authorization": ""}, {"Authorization": "Bearer "},
                                     {"Authorization": "Basic abc"}, {"Authorization": "Bearer wrong-key"}])
async def test_bad_keys_get_401(emulator_factory: EmulatorFactory, headers: dict[str, str]) -> None:
    emu = await emulator_factory(api_keys=["sk-evo-test-key"])
    status, answer, _ = await post(emu, {"prompt": "a cat"}, headers=headers)
    assert status == 401
    assert_error(answer, "authentication_error")


async def test_any_key_is_accepted_without_a_key_list(emulator: Emulator) -> None:
    status, _, _ = await post(emulator, {"prompt": "a cat"}, headers={"Authorization": "Bearer anything"})
    assert status == 200


async def test_402_when_the_balance_cannot_cover_the_reservation(emulator_factory: EmulatorFactory) -> None:
    price = catalog.MODELS["gpt-image-1.5"].credits_per_image
    emu = await emulator_factory(initial_credits=price * 3)
    status, _, _ = await post(emu, {"prompt": "a cat", "n": 2})
    assert status == 200
    status, answer, _ = await post(emu, {"prompt": "a dog", "n": 2})
    assert status == 402
    assert_error(answer, "insufficient_quota_error", code="insufficient_user_quota")
    status, _, _ = await post(emu, {"prompt": "a dog", "n": 1})
    assert status == 200


# --- Idempotency-Key -------------------------------------------------------------------------------------

IDEM = "bg1-v1-0123456789abcdef-a1"


async def test_same_key_same_body_replays_the_original_task(emulator: Emulator) -> None:
    body = {"prompt": "a lamp", "n": 2}
    status, first, response = await post(emulator, body, {**AUTH, "Idempotency-Key": IDEM})
    assert status == 200 and "Idempotency-Replayed" not in response.headers
    status, again, response = await post(emulator, dict(reversed(body.items())), {**AUTH, "Idempotency-Key": IDEM})
    assert status == 200
    assert response.headers["Idempotency-Replayed"] == "true"
    assert again["id"] == first["id"]
    stats = emulator.stats()
    assert stats["tasks_created"] == 1 and stats["idempotent_replays"] == 1
    rows = [t for t in emulator.tasks() if t["idempotency_key"] == IDEM]
    assert len(rows) == 1


async def test_same_key_other_body_is_a_409_conflict(emulator: Emulator) -> None:
    await post(emulator, {"prompt": "a lamp"}, {**AUTH, "Idempotency-Key": IDEM})
    status, answer, _ = await post(emulator, {"prompt": "a chair"}, {**AUTH, "Idempotency-Key": IDEM})
    assert status == 409
    assert_error(answer, "invalid_request_error", code="idempotency_conflict")
    assert emulator.stats()["tasks_created"] == 1


async def test_idempotency_keys_are_per_api_key(emulator: Emulator) -> None:
    await post(emulator, {"prompt": "a lamp"}, {**AUTH, "Idempotency-Key": IDEM})
    status, _, response = await post(emulator, {"prompt": "a lamp"},
                                     {"Authorization": "Bearer other", "Idempotency-Key": IDEM})
    assert status == 200 and "Idempotency-Replayed" not in response.headers


@pytest.mark.parametrize("key", ["short", "x" * 97, "has space in it 0123", "bad/slash/0123456789"])
async def test_malformed_idempotency_key_is_400(emulator: Emulator, key: str) -> None:
    status, answer, _ = await post(emulator, {"prompt": "a lamp"}, {**AUTH, "Idempotency-Key": key})
    assert status == 400
    assert_error(answer, "invalid_request_error", code="invalid_idempotency_key")


async def test_idempotency_switched_off_ignores_the_header(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(idempotency=False)
    _, first, _ = await post(emu, {"prompt": "a lamp"}, {**AUTH, "Idempotency-Key": IDEM})
    _, second, response = await post(emu, {"prompt": "a lamp"}, {**AUTH, "Idempotency-Key": IDEM})
    assert first["id"] != second["id"] and "Idempotency-Replayed" not in response.headers
    _, _, _ = await post(emu, {"prompt": "a lamp"}, {**AUTH, "Idempotency-Key": "short"})
    assert emu.stats()["tasks_created"] == 3
