"""Contract tests of the Files API on the emulator: the three uploads, list, quota, delete, the envelope,
every error code (40001-40004), the 72-hour expiry, and uploaded URLs used as image references."""

from __future__ import annotations

import base64
import hashlib
import io
from datetime import datetime, timedelta
from typing import Any

import aiohttp
import pytest
from PIL import Image

from batchgen.emulator import Emulator
from tests.emulator_fixtures import AUTH, EmulatorFactory

UPLOAD_FIELDS = {"file_id": str, "file_name": str, "original_name": str, "file_size": int, "mime_type": str,
                 "upload_path": str, "file_url": str, "download_url": str, "upload_time": str, "expires_at": str}


def image_bytes(fmt: str, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(out, format=fmt)
    return out.getvalue()


async def call(emu: Emulator, method: str, path: str, *, json: Any = None, data: Any = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.request(
        method, emu.base_url + path, json=json, data=data, headers=AUTH if headers is None else headers
    ) as response:
        return response.status, await response.json()


async def upload_b64(emu: Emulator, data: bytes, **fields: Any) -> tuple[int, Any]:
    return await call(emu, "POST", "/api/v1/files/upload/base64",
                      json={"base64_data": base64.b64encode(data).decode(), **fields})


async def upload_stream(emu: Emulator, data: bytes, name: str = "photo.png", **fields: str) -> tuple[int, Any]:
    form = aiohttp.FormData()
    form.add_field("file", data, filename=name, content_type="application/octet-stream")
    for key, value in fields.items():
        form.add_field(key, value)
    return await call(emu, "POST", "/api/v1/files/upload/stream", data=form)


def assert_uploaded(body: dict[str, Any], size: int, mime: str) -> dict[str, Any]:
    assert body["success"] is True and body["code"] == 200 and isinstance(body["msg"], str)
    data = body["data"]
    for field, type_ in UPLOAD_FIELDS.items():
        assert isinstance(data[field], type_), field
    assert data["file_size"] == size and data["mime_type"] == mime
    uploaded, expires = (datetime.fromisoformat(data[k]) for k in ("upload_time", "expires_at"))
    return data | {"_ttl": expires - uploaded}


@pytest.mark.parametrize(("fmt", "mime"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("GIF", "image/gif"),
                                           ("WEBP", "image/webp")])
async def test_base64_upload_of_each_allowed_type(emulator_factory: EmulatorFactory, fmt: str, mime: str) -> None:
    emu = await emulator_factory(time_scale=1.0)
    data = image_bytes(fmt)
    status, body = await upload_b64(emu, data, file_name="shot", upload_path="products/2026")
    assert status == 200
    record = assert_uploaded(body, len(data), mime)
    assert record["_ttl"] == timedelta(hours=72)
    assert record["upload_path"] == "products/2026" and record["file_name"] == "shot"
    async with aiohttp.ClientSession() as session, session.get(record["file_url"]) as response:
        assert response.status == 200 and await response.read() == data
        assert response.headers["Content-Type"] == mime


async def test_base64_data_url_and_stream_and_url_uploads(emulator: Emulator) -> None:
    data = image_bytes("PNG")
    status, body = await upload_b64(emulator, b"", base64_data="data:image/png;base64,"
                                    + base64.b64encode(data).decode())
    assert status == 200
    first = assert_uploaded(body, len(data), "image/png")

    status, body = await upload_stream(emulator, data, name="front.png", uploadPath="shots", fileName="f.png")
    assert status == 200
    streamed = assert_uploaded(body, len(data), "image/png")
    assert streamed["original_name"] == "front.png" and streamed["upload_path"] == "shots"
    assert streamed["file_name"] == "f.png"

    status, body = await call(emulator, "POST", "/api/v1/files/upload/url", json={"file_url": first["file_url"]})
    assert status == 200
    assert_uploaded(body, len(data), "image/png")

    async with aiohttp.ClientSession() as session, session.get(streamed["download_url"]) as response:
        assert response.status == 200
        assert "attachment" in response.headers["Content-Disposition"]

    stats = emulator.stats()
    assert stats["uploads"] == 3
    assert stats["uploads_by_sha256"] == {hashlib.sha256(data).hexdigest(): 3}
    status, listing = await call(emulator, "GET", "/_emulator/uploads")
    assert status == 200 and len(listing["data"]) == 3


async def test_url_upload_from_another_host(emulator_factory: EmulatorFactory) -> None:
    source = await emulator_factory(latency_s=0.0)
    target = await emulator_factory()
    status, task = await call(source, "POST", "/v1/images/generations", json={"prompt": "a cat"})
    assert status == 200
    status, body = await call(target, "POST", "/api/v1/files/upload/url", json={"file_url": task["results"][0]})
    assert status == 200 and body["data"]["mime_type"] == "image/png"


async def test_not_an_image_is_40002(emulator: Emulator) -> None:
    status, body = await upload_b64(emulator, b"%PDF-1.4 not an image at all")
    assert status == 400 and body == {"success": False, "code": 40002, "msg": body["msg"]}
    status, body = await upload_stream(emulator, b"GIF-ish but not", name="fake.png")
    assert status == 400 and body["code"] == 40002


async def test_too_large_is_40001(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(max_upload_bytes=100)
    big = image_bytes("PNG") + b"\0" * 200
    for status, body in (await upload_b64(emu, big), await upload_stream(emu, big)):
        assert status == 413 and body["success"] is False and body["code"] == 40001


async def test_quota_is_40003_and_delete_frees_a_slot(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(files_quota=2)
    ids = [(await upload_b64(emu, image_bytes("PNG", (i, 0, 0))))[1]["data"]["file_id"] for i in range(2)]
    status, body = await upload_b64(emu, image_bytes("PNG"))
    assert status == 400 and body["code"] == 40003
    status, body = await call(emu, "GET", "/api/v1/files/quota")
    assert status == 200
    assert body["data"] == {"user_group": "default", "used_files": 2, "max_files": 2, "remain_files": 0}
    status, body = await call(emu, "DELETE", f"/api/v1/files/{ids[0]}")
    assert status == 200 and body["success"] is True
    status, body = await call(emu, "DELETE", f"/api/v1/files/{ids[0]}")
    assert status == 404 and body["success"] is False
    assert (await upload_b64(emu, image_bytes("PNG")))[0] == 200


async def test_url_download_failure_is_40004(emulator: Emulator) -> None:
    for url in (emulator.base_url + "/_emulator/files/nothing/here.png", "ftp://example.com/x.png",
                "http://127.0.0.1:9/unreachable.png"):
        status, body = await call(emulator, "POST", "/api/v1/files/upload/url", json={"file_url": url})
        assert status == 400 and body["code"] == 40004, url


async def test_failures_as_http_200_variant(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(files_errors_as_200=True)
    status, body = await upload_b64(emu, b"not an image")
    assert status == 200 and body["success"] is False and body["code"] == 40002


async def test_list_pages_through_uploads(emulator: Emulator) -> None:
    for i in range(3):
        await upload_b64(emulator, image_bytes("PNG", (i, 1, 1)))
    status, body = await call(emulator, "GET", "/api/v1/files/list?page=2&pageSize=2")
    assert status == 200 and body["success"] is True
    assert body["data"]["total"] == 3 and len(body["data"]["files"]) == 1
    row = body["data"]["files"][0]
    for field in ("file_id", "file_name", "file_size", "upload_time"):
        assert field in row


async def test_files_api_needs_a_key(emulator: Emulator) -> None:
    status, body = await call(emulator, "GET", "/api/v1/files/quota", headers={})
    assert status == 401 and body["success"] is False and body["code"] == 401


async def test_uploads_expire_after_72_emulated_hours(emulator: Emulator) -> None:
    _, body = await upload_b64(emulator, image_bytes("PNG"))
    url = body["data"]["file_url"]
    emulator.advance(72 * 3600)
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 404
    _, quota = await call(emulator, "GET", "/api/v1/files/quota")
    assert quota["data"]["used_files"] == 0


async def test_uploaded_urls_are_accepted_as_image_references(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(latency_s=0.0)
    _, body = await upload_b64(emu, image_bytes("JPEG"))
    url, file_id = body["data"]["file_url"], body["data"]["file_id"]
    status, task = await call(emu, "POST", "/v1/images/generations",
                              json={"prompt": "make it blue", "model": "qwen-image-edit", "image_urls": [url]})
    assert status == 200 and task["status"] == "completed"
    await call(emu, "DELETE", f"/api/v1/files/{file_id}")
    status, task = await call(emu, "POST", "/v1/images/generations",
                              json={"prompt": "make it red", "model": "qwen-image-edit", "image_urls": [url]})
    assert status == 200
    assert task["status"] == "failed" and task["error"]["code"] == "image_processing_error"


async def test_injected_upload_faults_use_the_envelope(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(faults={"upload": {"http_503": 1.0}})
    status, body = await upload_b64(emu, image_bytes("PNG"))
    assert status == 503 and body["success"] is False and body["code"] == 503


async def test_a_gif_upload_is_not_a_usable_reference_image(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(latency_s=0.0)
    _, body = await upload_b64(emu, image_bytes("GIF"))
    request = {"prompt": "edit", "model": "qwen-image-edit", "image_urls": [body["data"]["file_url"]]}
    status, task = await call(emu, "POST", "/v1/images/generations", json=request)
    assert status == 200 and task["error"]["code"] == "image_processing_error"
