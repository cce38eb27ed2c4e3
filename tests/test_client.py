"""EvolinkClient against the wire contract: happy paths with the contract's example bodies, every error
mapping, the Files API envelope, the limiter hooks, and the key never leaking.

aioresponses covers most cases; a tiny aiohttp app on 127.0.0.1 (`live`) covers what it cannot express:
a dropped connection, a silent server, a chunked download, a real multipart upload, and the exact headers
a media host receives.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import struct
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aioresponses import aioresponses
from yarl import URL

from batchgen import __version__
from batchgen.api.answers import Credits, Downloaded, Quota, TaskSnapshot, UploadedFile
from batchgen.api.client import EvolinkClient
from batchgen.engine.ratelimit import AdaptiveLimiter, Lane
from batchgen.errors import ApiError, FilesApiError, HttpError, TransportError
from batchgen.units import Rate
from tests.emulator_fixtures import EmulatorFactory

API = "https://api.evolink.test"
FILES = "https://files-api.evolink.test"
KEY = "sk-evo-TOPSECRET-7f3a9c2e1b"
TASK_ID = "task-unified-1757156493-imcg5zqt"

# The contract's example bodies (API_CONTRACT.md).
CREATED = {
    "created": 1757156493, "id": TASK_ID, "model": "gemini-3.1-flash-image-preview",
    "object": "image.generation.task", "progress": 0, "status": "pending",
    "task_info": {"can_cancel": True, "estimated_time": 45}, "type": "image",
    "usage": {"billing_rule": "per_call", "credits_reserved": 1.6, "user_group": "default"},
}
RESULT_URL = "https://files.evolink.ai/acct/images/2026/07/01/0123456789abcdef0123456789abcdef_0.png"
COMPLETED = {
    "id": TASK_ID, "model": "gemini-3.1-flash-image-preview", "object": "image.generation.task", "progress": 100,
    "status": "completed", "results": [RESULT_URL], "result_data": [{"image_url": RESULT_URL}],
    "task_info": {"can_cancel": False}, "type": "image", "usage": {"credits_reserved": 1.6, "credits_used": 1.2},
}
UPLOADED = {
    "success": True, "code": 200, "msg": "ok",
    "data": {
        "file_id": "file_abc123", "file_name": "shoe.png", "original_name": "shoe.png", "file_size": 2048,
        "mime_type": "image/png", "upload_path": "batchgen", "file_url": "https://files.evolink.ai/u/shoe.png",
        "download_url": "https://files.evolink.ai/u/shoe.png?dl=1", "upload_time": "2026-07-01T10:00:00Z",
        "expires_at": "2026-07-04T10:00:00Z",
    },
}
PNG_HEAD = b"\x89PNG\r\n\x1a\n"


def tiny_png() -> bytes:
    """A valid 1×1 PNG, so sniffing and servers see a real image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return PNG_HEAD + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b"")


@pytest.fixture
def mocked() -> Iterator[aioresponses]:
    with aioresponses() as m:
        yield m


@pytest.fixture
async def client() -> AsyncIterator[EvolinkClient]:
    async with EvolinkClient(API, FILES, KEY) as c:
        yield c


def sent(m: aioresponses, method: str, url: str, index: int = 0) -> dict[str, Any]:
    """The kwargs of the `index`-th request aioresponses saw for (method, url)."""
    return m.requests[(method, URL(url))][index].kwargs


def error_of(exc_info: pytest.ExceptionInfo[ApiError]) -> ApiError:
    return exc_info.value


# --- generation: happy paths ----------------------------------------------------------------------


async def test_submit_sends_compact_json_with_key_agent_and_idempotency_key(
    mocked: aioresponses, client: EvolinkClient
) -> None:
    mocked.post(f"{API}/v1/images/generations", payload=CREATED, headers={"X-Request-Id": "req-1"})
    body = {"model": "gemini-3.1-flash-image-preview", "prompt": "a red shoe", "size": "1:1", "n": 1}
    snap = await client.submit(body, idempotency_key="bg1-0123456789abcdef-a1")
    assert snap == TaskSnapshot(
        id=TASK_ID, status="pending", progress=0, estimated_time_s=45.0, results=(), credits_reserved=1.6,
        credits_used=None, error_code=None, error_message=None, model="gemini-3.1-flash-image-preview",
        replayed=False, request_id="req-1",
    )
    assert not snap.final
    assert snap.raw["object"] == "image.generation.task"
    kwargs = sent(mocked, "POST", f"{API}/v1/images/generations")
    assert kwargs["data"] == b'{"model":"gemini-3.1-flash-image-preview","prompt":"a red shoe","size":"1:1","n":1}'
    headers = kwargs["headers"]
    assert headers["Authorization"] == f"Bearer {KEY}"
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == f"batchgen/{__version__}"
    assert headers["Idempotency-Key"] == "bg1-0123456789abcdef-a1"


async def test_submit_without_key_sends_no_idempotency_header(mocked: aioresponses, client: EvolinkClient) -> None:
    mocked.post(f"{API}/v1/images/generations", payload=CREATED)
    await client.submit({"model": "m", "prompt": "p"})
    assert "Idempotency-Key" not in sent(mocked, "POST", f"{API}/v1/images/generations")["headers"]


async def test_replayed_submit_is_flagged(mocked: aioresponses, client: EvolinkClient) -> None:
    mocked.post(f"{API}/v1/images/generations", payload=CREATED, headers={"Idempotency-Replayed": "true"})
    snap = await client.submit({"model": "m", "prompt": "p"}, idempotency_key="bg1-0123456789abcdef-a2")
    assert snap.replayed


async def test_bad_idempotency_key_is_a_bug_not_a_request(mocked: aioresponses, client: EvolinkClient) -> None:
    with pytest.raises(ValueError, match="16-96"):
        await client.submit({"model": "m", "prompt": "p"}, idempotency_key="short")
    assert not mocked.requests


async def test_submit_that_is_already_completed_reads_like_a_poll(mocked: aioresponses, client: EvolinkClient) -> None:
    mocked.post(f"{API}/v1/images/generations", payload=COMPLETED)
    snap = await client.submit({"model": "m", "prompt": "p"})
    assert snap.final and snap.results == (RESULT_URL,)


async def test_get_task_completed(mocked: aioresponses, client: EvolinkClient) -> None:
    mocked.get(f"{API}/v1/tasks/{TASK_ID}", payload=COMPLETED)
    snap = await client.get_task(TASK_ID)
    assert snap.status == "completed" and snap.final
    assert snap.progress == 100
    assert snap.results == (RESULT_URL,)
    assert (snap.credits_reserved, snap.credits_used) == (1.6, 1.2)
    assert snap.estimated_time_s is None
    assert sent(mocked, "GET", f"{API}/v1/tasks/{TASK_ID}")["headers"]["Authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        # result_data only: the URLs still come through
        ({**COMPLETED, "results": None}, ("completed", (RESULT_URL,), None, None)),
        (
            {"id": TASK_ID, "status": "failed",
             "error": {"code": "content_policy_violation", "message": "Refused by the safety system"}},
            ("failed", (), "content_policy_violation", "Refused by the safety system"),
        ),
        ({"id": TASK_ID, "status": "failed"}, ("failed", (), "unknown_error", None)),
        ({"id": TASK_ID, "status": "cancelled"}, ("cancelled", (), "request_cancelled", None)),
        ({"id": TASK_ID, "status": "processing", "progress": 40, "task_info": {"estimated_time": 12}},
         ("processing", (), None, None)),
    ],
)
async def test_task_shapes(
    mocked: aioresponses, client: EvolinkClient, task: dict[str, Any], expected: tuple[Any, ...]
) -> None:
    mocked.get(f"{API}/v1/tasks/{TASK_ID}", payload=task)
    snap = await client.get_task(TASK_ID)
    assert (snap.status, snap.results, snap.error_code, snap.error_message) == expected
    assert snap.final == (snap.status in ("completed", "failed", "cancelled"))


async def test_batch_poll(mocked: aioresponses, client: EvolinkClient) -> None:
    other = {**CREATED, "id": "task-unified-1757156493-zzzzzzzz", "status": "processing", "progress": 50}
    mocked.post(f"{API}/v1/tasks/batch", payload={"data": [COMPLETED, other]})
    unknown = "task-unified-1757156493-unknown0"
    snaps = await client.get_tasks([TASK_ID, other["id"], unknown])
    assert set(snaps) == {TASK_ID, other["id"]}  # the unknown id is simply absent
    assert snaps[TASK_ID].results == (RESULT_URL,)
    assert snaps[other["id"]].progress == 50
    assert client.batch_supported is True
    assert json.loads(sent(mocked, "POST", f"{API}/v1/tasks/batch")["data"]) == {
        "task_ids": [TASK_ID, other["id"], unknown]
    }


@pytest.mark.parametrize("status", [404, 405])
async def test_batch_route_missing_falls_back_to_single_polls(
    mocked: aioresponses, client: EvolinkClient, status: int
) -> None:
    gone = "task-unified-1757156493-gone0000"
    mocked.post(f"{API}/v1/tasks/batch", status=status, body="")
    mocked.get(f"{API}/v1/tasks/{TASK_ID}", payload=COMPLETED, repeat=True)
    mocked.get(f"{API}/v1/tasks/{gone}", status=404, repeat=True,
               payload={"error": {"code": "task_not_found", "message": "Task not found.", "type": "not_found_error"}})
    assert client.batch_supported is None
    snaps = await client.get_tasks([TASK_ID, gone])
    assert client.batch_supported is False
    assert set(snaps) == {TASK_ID}
    # Once known, the batch route is not tried again (aioresponses would refuse an unregistered repeat).
    assert set(await client.get_tasks([TASK_ID])) == {TASK_ID}
    assert len(mocked.requests[("POST", URL(f"{API}/v1/tasks/batch"))]) == 1


async def test_single_poll_fallback_raises_rather_than_report_a_task_missing(
    mocked: aioresponses, client: EvolinkClient
) -> None:
    client.batch_supported = False
    other = "task-unified-1757156493-broken00"
    mocked.get(f"{API}/v1/tasks/{TASK_ID}", payload=COMPLETED)
    mocked.get(f"{API}/v1/tasks/{other}", status=503, body="")
    with pytest.raises(HttpError) as exc_info:
        await client.get_tasks([TASK_ID, other])
    assert exc_info.value.status == 503


async def test_batch_poll_limits(client: EvolinkClient) -> None:
    assert await client.get_tasks([]) == {}
    with pytest.raises(ValueError, match="at most 50"):
        await client.get_tasks([f"task-unified-1-{i:08d}" for i in range(51)])


async def test_batch_error_other_than_404_is_raised(mocked: aioresponses, client: EvolinkClient) -> None:
    mocked.post(f"{API}/v1/tasks/batch", status=429, headers={"Retry-After": "2"}, body="")
    with pytest.raises(HttpError) as exc_info:
        await client.get_tasks([TASK_ID])
    assert exc_info.value.status == 429
    assert client.batch_supported is None


# --- credits --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # the key's allowance is tighter than the user's balance
        ({"user": {"remaining_credits": 500.0, "used_credits": 20.0},
          "token": {"remaining_credits": 80.0, "used_credits": 5.0, "unlimited_credits": False}},
         Credits(remaining=80.0, used=5.0, unlimited=False)),
        # the user's balance is tighter than the key's allowance
        ({"user": {"remaining_credits": 12.5, "used_credits": 20.0},
          "token": {"remaining_credits": 80.0, "used_credits": 5.0, "unlimited_credits": False}},
         Credits(remaining=12.5, used=5.0, unlimited=False)),
        # an unlimited key: the user's balance is what is left
        ({"user": {"remaining_credits": 300.0, "used_credits": 20.0},
          "token": {"remaining_credits": 0, "used_credits": 7.0, "unlimited_credits": True}},
         Credits(remaining=300.0, used=7.0, unlimited=True)),
        ({"user": {"remaining_credits": 42, "used_credits": 1}}, Credits(remaining=42.0, used=1.0, unlimited=False)),
    ],
)
async def test_credits(mocked: aioresponses, client: EvolinkClient, data: dict[str, Any], expected: Credits) -> None:
    mocked.get(f"{API}/v1/credits", payload={"success": True, "data": data})
    assert await client.credits() == expected


@pytest.mark.parametrize("status", [404, 405])
async def test_credits_route_missing_is_none(mocked: aioresponses, client: EvolinkClient, status: int) -> None:
    mocked.get(f"{API}/v1/credits", status=status, body="Not Found", content_type="text/plain")
    assert await client.credits() is None


async def test_credits_with_a_bad_key_is_401(mocked: aioresponses, client: EvolinkClient) -> None:
    mocked.get(f"{API}/v1/credits", status=401,
               payload={"error": {"code": 401, "message": "Invalid API key", "type": "authentication_error"}})
    with pytest.raises(HttpError) as exc_info:
        await client.credits()
    assert (exc_info.value.status, exc_info.value.code) == (401, "401")


# --- error mapping --------------------------------------------------------------------------------

HTML_500 = "<html><head><title>500 Internal Server Error</title></head><body>" + "x" * 2000 + "</body></html>"


@pytest.mark.parametrize(
    ("status", "kwargs", "code", "retry_after_s", "in_message"),
    [
        (400, {"payload": {"error": {"code": "invalid_parameters", "message": "size 7:3 is not supported",
                                     "type": "invalid_request_error", "param": "size"}}},
         "invalid_parameters", None, "size 7:3 is not supported"),
        (402, {"payload": {"error": {"code": 402, "message": "Insufficient user quota",
                                     "type": "insufficient_quota_error"}}},
         "402", None, "Insufficient user quota"),
        (404, {"payload": {"error": {"code": "task_not_found", "message": "Task not found.",
                                     "type": "not_found_error"}}},
         "task_not_found", None, "Task not found."),
        (429, {"payload": {"error": {"code": 429, "message": "Rate limit exceeded", "type": "rate_limit_error"}},
               "headers": {"Retry-After": "0.3"}},
         "429", 0.3, "Rate limit exceeded"),
        (429, {"body": "", "headers": {"Retry-After": "7"}}, None, 7.0, "empty body"),
        (500, {"body": HTML_500, "content_type": "text/html"}, None, None, "Internal Server Error"),
        (503, {"body": ""}, None, None, "empty body"),
        (502, {"body": "upstream went away", "content_type": "text/plain"}, None, None, "Bad Gateway"),
    ],
)
async def test_http_errors_are_mapped(
    mocked: aioresponses,
    client: EvolinkClient,
    status: int,
    kwargs: dict[str, Any],
    code: str | None,
    retry_after_s: float | None,
    in_message: str,
) -> None:
    headers = {"X-Request-Id": "req-err", **kwargs.pop("headers", {})}
    mocked.get(f"{API}/v1/tasks/{TASK_ID}", status=status, headers=headers, **kwargs)
    with pytest.raises(HttpError) as exc_info:
        await client.get_task(TASK_ID)
    err = exc_info.value
    assert (err.status, err.code, err.retry_after_s, err.request_id) == (status, code, retry_after_s, "req-err")
    assert in_message in err.message
    assert "req-err" in str(err)
    if err.body_excerpt is not None:
        assert len(err.body_excerpt) <= 300


async def test_html_error_body_is_excerpted(mocked: aioresponses, client: EvolinkClient) -> None:
    mocked.get(f"{API}/v1/tasks/{TASK_ID}", status=500, body=HTML_500, content_type="text/html")
    with pytest.raises(HttpError) as exc_info:
        await client.get_task(TASK_ID)
    excerpt = exc_info.value.body_excerpt
    assert excerpt is not None and excerpt.startswith("<html>") and len(excerpt) == 300


async def test_retry_after_as_http_date(mocked: aioresponses, client: EvolinkClient) -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    mocked.post(f"{API}/v1/images/generations", status=429, body="",
                headers={"Retry-After": format_datetime(when, usegmt=True)})
    with pytest.raises(HttpError) as exc_info:
        await client.submit({"model": "m", "prompt": "p"})
    assert exc_info.value.retry_after_s is not None
    assert 20 <= exc_info.value.retry_after_s <= 31


@pytest.mark.parametrize("value", ["soon", "-5", "nan", ""])
async def test_unusable_retry_after_is_ignored_or_clamped(
    mocked: aioresponses, client: EvolinkClient, value: str
) -> None:
    mocked.get(f"{API}/v1/tasks/{TASK_ID}", status=429, body="", headers={"Retry-After": value})
    with pytest.raises(HttpError) as exc_info:
        await client.get_task(TASK_ID)
    assert exc_info.value.retry_after_s in (None, 0.0)


@pytest.mark.parametrize("body", ["{not json", "[1, 2]", "", "<html>ok</html>"])
async def test_malformed_json_on_200_is_a_transport_error(
    mocked: aioresponses, client: EvolinkClient, body: str
) -> None:
    mocked.get(f"{API}/v1/tasks/{TASK_ID}", status=200, body=body)
    with pytest.raises(TransportError) as exc_info:
        await client.get_task(TASK_ID)
    assert exc_info.value.status == 200


async def test_task_object_without_id_is_a_transport_error(mocked: aioresponses, client: EvolinkClient) -> None:
    mocked.post(f"{API}/v1/images/generations", payload={"status": "pending"})
    with pytest.raises(TransportError):
        await client.submit({"model": "m", "prompt": "p"})


@pytest.mark.parametrize(
    "exception",
    [
        aiohttp.ClientConnectionError("Connection reset by peer"),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientConnectorError(aiohttp.client_reqrep.ConnectionKey(
            "api.evolink.test", 443, True, None, None, None, None), OSError(111, "Connection refused")),
        TimeoutError(),
        aiohttp.ClientPayloadError("Response payload is not completed"),
    ],
)
async def test_network_failures_are_transport_errors(
    mocked: aioresponses, client: EvolinkClient, exception: BaseException
) -> None:
    mocked.get(f"{API}/v1/tasks/{TASK_ID}", exception=exception)
    with pytest.raises(TransportError) as exc_info:
        await client.get_task(TASK_ID)
    assert exc_info.value.status is None
    assert exc_info.value.__cause__ is exception


async def test_use_outside_the_context_manager_is_a_bug() -> None:
    c = EvolinkClient(API, FILES, KEY)
    with pytest.raises(RuntimeError, match="async with"):
        await c.get_task(TASK_ID)


# --- downloads ------------------------------------------------------------------------------------


async def test_download_returns_bytes_and_type_without_the_key(mocked: aioresponses, client: EvolinkClient) -> None:
    png = tiny_png()
    mocked.get(RESULT_URL, body=png, content_type="image/png")
    got = await client.download(RESULT_URL)
    assert got == Downloaded(data=png, content_type="image/png", url=RESULT_URL)
    headers = sent(mocked, "GET", RESULT_URL)["headers"] or {}
    assert "Authorization" not in headers


async def test_download_not_found_and_too_large(mocked: aioresponses, client: EvolinkClient) -> None:
    mocked.get(RESULT_URL, status=404, body="expired", content_type="text/plain")
    with pytest.raises(HttpError) as exc_info:
        await client.download(RESULT_URL)
    assert exc_info.value.status == 404
    mocked.get(RESULT_URL, body=b"x" * 5000, content_type="image/png")
    with pytest.raises(HttpError) as exc_info:
        await client.download(RESULT_URL, max_bytes=1000)
    assert exc_info.value.code == "download_too_large"


async def test_download_failure_message_drops_the_query(mocked: aioresponses, client: EvolinkClient) -> None:
    signed = RESULT_URL + "?token=signed-secret"
    mocked.get(signed, exception=aiohttp.ServerDisconnectedError())
    with pytest.raises(TransportError) as exc_info:
        await client.download(signed)
    assert "signed-secret" not in str(exc_info.value)


# --- Files API ------------------------------------------------------------------------------------


async def test_upload_base64_sends_a_data_url(mocked: aioresponses, client: EvolinkClient) -> None:
    mocked.post(f"{FILES}/api/v1/files/upload/base64", payload=UPLOADED)
    up = await client.upload_base64(PNG_HEAD, "shoe.png", "image/png")
    assert up == UploadedFile(
        file_id="file_abc123", file_url="https://files.evolink.ai/u/shoe.png", file_name="shoe.png", file_size=2048,
        mime_type="image/png", expires_at=datetime(2026, 7, 4, 10, tzinfo=UTC),
        upload_time=datetime(2026, 7, 1, 10, tzinfo=UTC),
    )
    assert up.expires_at.tzinfo is not None
    kwargs = sent(mocked, "POST", f"{FILES}/api/v1/files/upload/base64")
    assert json.loads(kwargs["data"]) == {"base64_data": "data:image/png;base64,iVBORw0KGgo=", "file_name": "shoe.png"}
    assert kwargs["headers"]["Authorization"] == f"Bearer {KEY}"


async def test_upload_url(mocked: aioresponses, client: EvolinkClient) -> None:
    no_expiry = {**UPLOADED, "data": {**UPLOADED["data"], "expires_at": None}}
    mocked.post(f"{FILES}/api/v1/files/upload/url", payload=no_expiry)
    up = await client.upload_url("https://example.com/shoe.png")
    assert json.loads(sent(mocked, "POST", f"{FILES}/api/v1/files/upload/url")["data"]) == {
        "file_url": "https://example.com/shoe.png"
    }
    assert up.expires_at == datetime(2026, 7, 4, 10, tzinfo=UTC)  # upload time + 72 h


async def test_list_quota_delete(mocked: aioresponses, client: EvolinkClient) -> None:
    files = [{"file_id": "f1", "file_name": "a.png", "file_size": 10, "upload_time": "2026-07-01T10:00:00Z"}]
    mocked.get(f"{FILES}/api/v1/files/list?page=2&pageSize=50",
               payload={"success": True, "code": 200, "msg": "ok", "data": {"total": 51, "files": files}})
    mocked.get(f"{FILES}/api/v1/files/quota", payload={"success": True, "code": 200, "data": {
        "user_group": "default", "used_files": 3, "max_files": 100, "remain_files": 97}})
    mocked.delete(f"{FILES}/api/v1/files/f1", payload={"success": True, "code": 200, "msg": "deleted"})
    assert await client.list_files(page=2, page_size=50) == (51, files)
    assert await client.quota() == Quota(used_files=3, max_files=100, remain_files=97, user_group="default")
    assert await client.delete_file("f1") is None


async def test_files_success_false_on_200(mocked: aioresponses, client: EvolinkClient) -> None:
    mocked.post(f"{FILES}/api/v1/files/upload/base64", status=200, headers={"X-Request-Id": "req-f"},
                payload={"success": False, "code": 40003, "msg": "File quota exceeded"})
    with pytest.raises(FilesApiError) as exc_info:
        await client.upload_base64(PNG_HEAD, "a.png", "image/png")
    err = exc_info.value
    assert (err.status, err.code, err.message, err.request_id) == (200, "40003", "File quota exceeded", "req-f")


@pytest.mark.parametrize(
    ("status", "kwargs", "code"),
    [
        (413, {"payload": {"success": False, "code": 40001, "msg": "File too large"}}, "40001"),
        (401, {"payload": {"error": {"code": 401, "message": "Invalid API key"}}}, "401"),
        (500, {"body": "<h1>oops</h1>", "content_type": "text/html"}, None),
    ],
)
async def test_files_http_errors(
    mocked: aioresponses, client: EvolinkClient, status: int, kwargs: dict[str, Any], code: str | None
) -> None:
    mocked.get(f"{FILES}/api/v1/files/quota", status=status, **kwargs)
    with pytest.raises(FilesApiError) as exc_info:
        await client.quota()
    assert (exc_info.value.status, exc_info.value.code) == (status, code)


# --- limiter hooks --------------------------------------------------------------------------------


class RecordingLimiter(AdaptiveLimiter):
    """A real limiter that also records what the client told it."""

    def __init__(self) -> None:
        super().__init__(Rate(1000, 1))
        self.calls: list[tuple[str, float | str | None]] = []

    async def acquire(self, lane: Lane = "submit") -> None:
        self.calls.append(("acquire", lane))
        await super().acquire(lane)

    def penalize(self, retry_after_s: float | None) -> None:
        self.calls.append(("penalize", retry_after_s))

    def reward(self) -> None:
        self.calls.append(("reward", None))


async def test_limiter_hooks(mocked: aioresponses) -> None:
    limiter = RecordingLimiter()
    mocked.post(f"{API}/v1/images/generations", payload=CREATED)
    mocked.get(f"{API}/v1/tasks/{TASK_ID}", status=429, body="", headers={"Retry-After": "0.3"})
    mocked.get(f"{API}/v1/tasks/{TASK_ID}", status=500, body="")
    mocked.get(f"{FILES}/api/v1/files/quota", status=429, body="")
    mocked.get(RESULT_URL, body=PNG_HEAD, content_type="image/png")
    async with EvolinkClient(API, FILES, KEY, limiter=limiter) as c:
        await c.submit({"model": "m", "prompt": "p"})
        for _ in range(2):
            with pytest.raises(HttpError):
                await c.get_task(TASK_ID)
        with pytest.raises(FilesApiError):
            await c.quota()
        await c.download(RESULT_URL)  # a media host: not rate limited
    assert limiter.calls == [
        ("acquire", "submit"), ("reward", None),
        ("acquire", "poll"), ("penalize", 0.3),
        ("acquire", "poll"),
        ("acquire", "submit"), ("penalize", None),
    ]


async def test_batch_polls_take_the_poll_lane_and_credits_the_submit_lane(mocked: aioresponses) -> None:
    limiter = RecordingLimiter()
    mocked.post(f"{API}/v1/tasks/batch", payload={"data": []})
    mocked.get(f"{API}/v1/credits", payload={"data": {"remaining": 5}})
    async with EvolinkClient(API, FILES, KEY, limiter=limiter) as c:
        await c.get_tasks(["task-1"])
        await c.credits()
    assert [lane for kind, lane in limiter.calls if kind == "acquire"] == ["poll", "submit"]


async def test_retry_after_as_an_http_date_sets_the_cool_down(mocked: aioresponses) -> None:
    limiter = AdaptiveLimiter(Rate(10, 1))
    when = email.utils.formatdate(time.time() + 3, usegmt=True)  # whole seconds: 2-3 s from now
    mocked.get(f"{API}/v1/tasks/{TASK_ID}", status=429, body="", headers={"Retry-After": when})
    async with EvolinkClient(API, FILES, KEY, limiter=limiter) as c:
        with pytest.raises(HttpError) as exc_info:
            await c.get_task(TASK_ID)
        assert exc_info.value.retry_after_s is not None and 1.5 <= exc_info.value.retry_after_s <= 3.0
        assert 1.5 <= limiter.pause_remaining_s() <= 3.0 * 1.1  # plus at most 10% positive jitter
    assert limiter.throttles == 1


# --- the key never leaks --------------------------------------------------------------------------


async def test_the_key_never_appears_in_errors_reprs_or_logs(
    mocked: aioresponses, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    echo = f"invalid key {KEY}"
    mocked.get(f"{API}/v1/tasks/t-json", status=401,
               payload={"error": {"code": echo, "message": echo, "type": "authentication_error"}})
    mocked.get(f"{API}/v1/tasks/t-html", status=500, body=f"<pre>Authorization: Bearer {KEY}</pre>")
    mocked.get(f"{API}/v1/tasks/t-200", status=200, body=f"not json {KEY}")
    mocked.get(f"{API}/v1/tasks/t-reset", exception=aiohttp.ClientConnectionError(f"reset while sending {KEY}"))
    mocked.get(f"{API}/v1/tasks/t-timeout", exception=TimeoutError())
    mocked.get(f"{FILES}/api/v1/files/quota", status=200, payload={"success": False, "code": 40003, "msg": echo})
    mocked.get(f"{FILES}/api/v1/files/list?page=1&pageSize=100", status=403, body=echo)
    mocked.get(RESULT_URL, status=403, body=echo)
    errors: list[ApiError] = []
    async with EvolinkClient(API, FILES, KEY) as c:
        assert KEY not in repr(c)
        for task_id in ("t-json", "t-html", "t-200", "t-reset", "t-timeout"):
            with pytest.raises(ApiError) as exc_info:
                await c.get_task(task_id)
            errors.append(exc_info.value)
        with pytest.raises(ApiError) as exc_info:
            await c.quota()
        errors.append(exc_info.value)
        with pytest.raises(ApiError) as exc_info:
            await c.list_files()
        errors.append(exc_info.value)
        with pytest.raises(ApiError) as exc_info:
            await c.download(RESULT_URL)
        errors.append(exc_info.value)
    assert len(errors) == 8
    for err in errors:
        for text in (str(err), repr(err), err.message, err.body_excerpt or "", err.code or ""):
            assert KEY not in text
    assert any("[redacted]" in (err.body_excerpt or "") for err in errors)
    assert KEY not in caplog.text


# --- a real server for what aioresponses cannot express -------------------------------------------


class Live:
    """A tiny aiohttp app on 127.0.0.1 that records what it receives."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.uploads: list[dict[str, Any]] = []
        self.release = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_get("/img.png", self.image)
        self.app.router.add_get("/chunked.png", self.chunked)
        self.app.router.add_get("/v1/tasks/{task_id}", self.drop)
        self.app.router.add_get("/v1/credits", self.silent)
        self.app.router.add_post("/api/v1/files/upload/stream", self.upload)

    async def image(self, request: web.Request) -> web.Response:
        self.seen.append((request.path, dict(request.headers)))
        return web.Response(body=tiny_png(), content_type="image/png", headers={"X-Request-Id": "media-1"})

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(10):
            await resp.write(b"x" * 1000)
        await resp.write_eof()
        return resp

    async def drop(self, request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.abort()  # the connection dies before any answer
        raise ConnectionResetError

    async def silent(self, request: web.Request) -> web.Response:
        await self.release.wait()  # never answers within the client's timeout
        return web.json_response({})

    async def upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        part = form["file"]
        assert isinstance(part, web.FileField)
        self.uploads.append({
            "filename": part.filename, "content_type": part.content_type, "data": part.file.read(),
            "file_name": form.get("file_name"), "authorization": request.headers.get("Authorization"),
        })
        return web.json_response(UPLOADED)


@pytest.fixture
async def live() -> AsyncIterator[tuple[Live, str]]:
    server = Live()
    async with TestServer(server.app) as test_server:
        yield server, str(test_server.make_url("")).rstrip("/")
        server.release.set()


async def test_media_host_receives_no_authorization_header(live: tuple[Live, str]) -> None:
    server, base = live
    async with EvolinkClient(base, base, KEY) as c:
        got = await c.download(f"{base}/img.png")
    assert got.content_type == "image/png" and got.data.startswith(PNG_HEAD)
    (_path, headers), = server.seen
    assert "Authorization" not in headers
    assert headers["User-Agent"] == f"batchgen/{__version__}"


async def test_chunked_download_over_the_cap_is_refused(live: tuple[Live, str]) -> None:
    _, base = live
    async with EvolinkClient(base, base, KEY) as c:
        assert len((await c.download(f"{base}/chunked.png")).data) == 10_000
        with pytest.raises(HttpError) as exc_info:
            await c.download(f"{base}/chunked.png", max_bytes=4_000)
    assert exc_info.value.code == "download_too_large"


async def test_dropped_connection_is_a_transport_error(live: tuple[Live, str]) -> None:
    _, base = live
    async with EvolinkClient(base, base, KEY) as c:
        with pytest.raises(TransportError) as exc_info:
            await c.get_task(TASK_ID)
    assert exc_info.value.status is None


async def test_silent_server_is_a_transport_error(live: tuple[Live, str]) -> None:
    _, base = live
    async with EvolinkClient(base, base, KEY, timeout_s=0.2) as c:
        with pytest.raises(TransportError) as exc_info:
            await c.credits()
    assert "Timeout" in str(exc_info.value)


async def test_stream_upload_is_multipart_with_a_sniffed_type(live: tuple[Live, str], tmp_path: Path) -> None:
    server, base = live
    photo = tmp_path / "product photo.bin"  # the extension lies; the bytes say PNG
    photo.write_bytes(tiny_png())
    async with EvolinkClient(base, base, KEY) as c:
        up = await c.upload_file(photo)
        await c.upload_file(photo, file_name="shoe.png")
    assert up.file_id == "file_abc123"
    first, second = server.uploads
    assert first == {"filename": "product photo.bin", "content_type": "image/png", "data": tiny_png(),
                     "file_name": None, "authorization": f"Bearer {KEY}"}
    assert (second["filename"], second["file_name"]) == ("shoe.png", "shoe.png")


# --- against the built-in emulator (shared fixture from tests/emulator_fixtures.py) ------------------


async def test_emulator_round_trip(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(latency_s=0.0)
    body = {"model": "gemini-3.1-flash-image-preview", "prompt": "a red shoe on marble"}
    async with EvolinkClient(emu.base_url, emu.base_url, "sk-evo-test-key") as c:
        first = await c.submit(body, idempotency_key="bg1-0123456789abcdef-a1")
        again = await c.submit(body, idempotency_key="bg1-0123456789abcdef-a1")
        assert (again.id, again.replayed, first.replayed) == (first.id, True, False)
        assert first.request_id
        snaps: dict[str, TaskSnapshot] = {}
        for _ in range(200):
            snaps = await c.get_tasks([first.id, "task-unified-1757156493-unknown0"])
            if snaps[first.id].final:
                break
            await asyncio.sleep(0.01)
        done = snaps[first.id]
        assert set(snaps) == {first.id} and c.batch_supported is True
        assert done.status == "completed" and done.results
        image = await c.download(done.results[0])
        assert image.content_type == "image/png" and image.data.startswith(PNG_HEAD)
        credits = await c.credits()
        assert credits is not None and credits.used == done.credits_used
        with pytest.raises(HttpError) as exc_info:
            await c.get_task("task-unified-1757156493-missing0")
        assert (exc_info.value.status, exc_info.value.code) == (404, "task_not_found")
    stats = emu.stats()
    assert (stats["tasks_created"], stats["idempotent_replays"]) == (1, 1)


async def test_emulator_older_gateway(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(latency_s=0.0, batch_poll=False, credits_endpoint=False)
    async with EvolinkClient(emu.base_url, emu.base_url, "sk-evo-test-key") as c:
        task = await c.submit({"model": "gemini-3.1-flash-image-preview", "prompt": "a shoe"})
        snaps = await c.get_tasks([task.id])
        assert c.batch_supported is False and set(snaps) == {task.id}
        assert await c.credits() is None


async def test_emulator_rate_limit_penalizes_the_limiter(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(rate_limit=2.0)
    limiter = AdaptiveLimiter(Rate(50, 1))
    async with EvolinkClient(emu.base_url, emu.base_url, "sk-evo-test-key", limiter=limiter) as c:
        outcomes = await asyncio.gather(*(c.quota() for _ in range(6)), return_exceptions=True)
    limited = [o for o in outcomes if isinstance(o, FilesApiError | HttpError) and o.status == 429]
    assert limited and limiter.throttles == len(limited)
    assert limiter.effective_rate < 50
    assert all(isinstance(o, Quota) or o in limited for o in outcomes)


async def test_emulator_files_api(emulator_factory: EmulatorFactory, tmp_path: Path) -> None:
    emu = await emulator_factory(files_quota=1, files_errors_as_200=True)
    photo = tmp_path / "shoe.png"
    photo.write_bytes(tiny_png())
    async with EvolinkClient(emu.base_url, emu.base_url, "sk-evo-test-key") as c:
        up = await c.upload_file(photo, file_name="catalogue-shoe.png")
        assert (up.file_name, up.mime_type) == ("catalogue-shoe.png", "image/png")
        assert up.expires_at > datetime.now(UTC)
        assert await c.quota() == Quota(used_files=1, max_files=1, remain_files=0, user_group="default")
        total, files = await c.list_files()
        assert total == 1 and files[0]["file_id"] == up.file_id
        with pytest.raises(FilesApiError) as exc_info:
            await c.upload_base64(tiny_png(), "other.png", "image/png")
        assert (exc_info.value.status, exc_info.value.code) == (200, "40003")
        await c.delete_file(up.file_id)
        assert (await c.quota()).used_files == 0
