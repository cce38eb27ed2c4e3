"""The Files API's routes (upload by base64, multipart stream or URL; list; quota; delete).

They answer in the Files API's envelope (`{"success", "code", "msg", "data"}`), failures included: the
Files API is a separate service on the real side (files-api.evolink.ai) with its own body shape, and the
emulator serves it on the same port under /api/v1/files/.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from batchgen.emulator.api_routes import FILES_PREFIX, KEY, NOW, STATE, draw_fault, origin
from batchgen.emulator.files import URL_DOWNLOAD_FAILED, FilesProblem, StoredFile
from batchgen.emulator.responses import files_error, files_ok

HTTP_SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("emulator_http_session", aiohttp.ClientSession)
_URL_TIMEOUT_S = 15.0
_CHUNK = 256 * 1024


def _refused(request: web.Request, problem: FilesProblem) -> web.Response:
    status = 413 if problem.code == 40001 else 400
    return files_error(status, problem.code, problem.msg, as_200=request.app[STATE].config.files_errors_as_200)


def _bad(request: web.Request, msg: str) -> web.Response:
    return files_error(400, 400, msg, as_200=request.app[STATE].config.files_errors_as_200)


def _uploaded(request: web.Request, stored: StoredFile) -> web.Response:
    return files_ok(stored.record(origin(request)), msg="File uploaded successfully")


async def _json_fields(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise FilesProblem(400, "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise FilesProblem(400, "The request body must be a JSON object.")
    return body


def _store(request: web.Request, data: bytes, fields: dict[str, Any], original: str | None) -> StoredFile:
    return request.app[STATE].files.add(
        request[KEY], data, original_name=original,
        file_name=fields.get("file_name") or fields.get("fileName"),
        upload_path=fields.get("upload_path") or fields.get("uploadPath"),
    )


async def upload_base64(request: web.Request) -> web.Response:
    answer, _ = draw_fault(request, request.app[STATE].config.faults.upload, "upload", envelope=True)
    if answer is not None:
        return answer
    try:
        fields = await _json_fields(request)
        text = fields.get("base64_data")
        if not isinstance(text, str) or not text:
            return _bad(request, "base64_data is required.")
        if text.startswith("data:"):
            text = text.partition(",")[2]
        request.app[STATE].files.check_size(len(text) * 3 // 4 - 2)
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return _bad(request, "base64_data is not valid base64.")
        return _uploaded(request, _store(request, data, fields, fields.get("file_name")))
    except FilesProblem as problem:
        return _refused(request, problem)


async def upload_stream(request: web.Request) -> web.Response:
    state = request.app[STATE]
    answer, _ = draw_fault(request, state.config.faults.upload, "upload", envelope=True)
    if answer is not None:
        return answer
    if not request.content_type.startswith("multipart/"):
        return _bad(request, "Expected a multipart/form-data body with a `file` part.")
    fields: dict[str, Any] = {}
    data: bytes | None = None
    original: str | None = None
    try:
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, aiohttp.BodyPartReader):
                continue
            if part.name == "file":
                original = part.filename
                chunks, size = [], 0
                while chunk := await part.read_chunk(_CHUNK):
                    size += len(chunk)
                    # Refuse as soon as the cap is passed rather than holding the whole body.
                    state.files.check_size(size)
                    chunks.append(chunk)
                data = b"".join(chunks)
            elif part.name:
                fields[part.name] = (await part.text())[:1000]
        if data is None:
            return _bad(request, "The multipart body has no `file` part.")
        return _uploaded(request, _store(request, data, fields, original))
    except FilesProblem as problem:
        return _refused(request, problem)


async def upload_url(request: web.Request) -> web.Response:
    state = request.app[STATE]
    answer, _ = draw_fault(request, state.config.faults.upload, "upload", envelope=True)
    if answer is not None:
        return answer
    try:
        fields = await _json_fields(request)
        url = fields.get("file_url")
        if not isinstance(url, str) or not url:
            return _bad(request, "file_url is required.")
        data = await _fetch(request, url)
        original = urlsplit(url).path.rsplit("/", 1)[-1] or None
        return _uploaded(request, _store(request, data, fields, original))
    except FilesProblem as problem:
        return _refused(request, problem)


async def _fetch(request: web.Request, url: str) -> bytes:
    """The bytes at `url`; the emulator's own file URLs are read from memory."""
    state = request.app[STATE]
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise FilesProblem(URL_DOWNLOAD_FAILED, "URL download failed: only http(s) URLs can be fetched.")
    if parts.netloc == request.host and parts.path.startswith(FILES_PREFIX):
        tail = parts.path[len(FILES_PREFIX):]
        own = state.files.lookup(tail, request[NOW])
        if own is not None:
            return own.data
        result = state.tasks.result(tail, request[NOW])
        if result is not None:
            from batchgen.emulator.images import render_png

            task, index = result
            return render_png(task.prompt, task.size, index, task.image_fault, task.generation,
                              task.idempotency_key or "")
        raise FilesProblem(URL_DOWNLOAD_FAILED, "URL download failed: HTTP 404.")
    limit = state.config.max_upload_bytes
    try:
        timeout = aiohttp.ClientTimeout(total=_URL_TIMEOUT_S)
        async with request.app[HTTP_SESSION].get(url, timeout=timeout) as response:
            if response.status != 200:
                raise FilesProblem(URL_DOWNLOAD_FAILED, f"URL download failed: HTTP {response.status}.")
            chunks, size = [], 0
            async for chunk in response.content.iter_chunked(_CHUNK):
                size += len(chunk)
                if size > limit:
                    state.files.check_size(size)
                chunks.append(chunk)
            return b"".join(chunks)
    except (aiohttp.ClientError, TimeoutError) as error:
        raise FilesProblem(URL_DOWNLOAD_FAILED, f"URL download failed: {type(error).__name__}.") from None


async def list_files(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        page = max(1, int(request.query.get("page", "1")))
        size = max(1, min(100, int(request.query.get("pageSize", request.query.get("page_size", "20")))))
    except ValueError:
        return _bad(request, "page and pageSize must be integers.")
    files = state.files.active(request[KEY], request[NOW])
    shown = files[(page - 1) * size: page * size]
    base = origin(request)
    rows = []
    for f in shown:
        record = f.record(base)
        rows.append({k: record[k] for k in ("file_id", "file_name", "original_name", "file_size", "mime_type",
                                             "file_url", "upload_time", "expires_at")})
    return files_ok({"total": len(files), "page": page, "pageSize": size, "files": rows})


async def quota(request: web.Request) -> web.Response:
    state = request.app[STATE]
    used = len(state.files.active(request[KEY], request[NOW]))
    limit = state.config.files_quota
    return files_ok({"user_group": "default", "used_files": used, "max_files": limit,
                     "remain_files": max(0, limit - used)})


async def delete_file(request: web.Request) -> web.Response:
    state = request.app[STATE]
    file_id = request.match_info["file_id"]
    if not state.files.delete(request[KEY], file_id, request[NOW]):
        return files_error(404, 404, "File not found.", as_200=state.config.files_errors_as_200)
    return files_ok({"file_id": file_id}, msg="File deleted successfully")


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/files/upload/base64", upload_base64)
    app.router.add_post("/api/v1/files/upload/stream", upload_stream)
    app.router.add_post("/api/v1/files/upload/url", upload_url)
    app.router.add_get("/api/v1/files/list", list_files)
    app.router.add_get("/api/v1/files/quota", quota)
    app.router.add_delete("/api/v1/files/{file_id}", delete_file)
