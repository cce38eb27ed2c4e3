"""The emulator's own routes under /_emulator/, which the real API does not have.

Result images and uploaded files are served here (no Authorization, not rate limited: on the real side
they come from a CDN). The rest is for tests and benchmarks: stats, every task with its prompt and
idempotency key, every upload with its content hash, and a few controls (cancel a task, move the clock,
set a balance).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from batchgen.emulator.api_routes import NOW, STATE
from batchgen.emulator.images import render_png
from batchgen.emulator.responses import api_error, json_response


async def stats(request: web.Request) -> web.Response:
    return json_response(request.app[STATE].snapshot())


async def tasks(request: web.Request) -> web.Response:
    """Every task; `?status=completed` (or any status) filters."""
    rows = request.app[STATE].tasks.listing(request[NOW])
    wanted = request.query.get("status")
    if wanted:
        rows = [r for r in rows if r["status"] == wanted]
    return json_response({"data": rows})


async def uploads(request: web.Request) -> web.Response:
    return json_response({"data": request.app[STATE].files.listing()})


async def cancel(request: web.Request) -> web.Response:
    state = request.app[STATE]
    task = state.tasks.tasks.get(request.match_info["task_id"])
    if task is None:
        return api_error(404, "task_not_found", "Task not found.")
    return json_response({"cancelled": state.tasks.cancel(task, request[NOW])})


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="expected a JSON object")
    return body


async def advance(request: web.Request) -> web.Response:
    """Move the clock forward by `{"seconds": N}` emulated seconds (expiry tests without waiting)."""
    body = await _body(request)
    state = request.app[STATE]
    state.clock.advance(float(body.get("seconds", 0)))
    state.tasks.settle(state.clock.now())
    return json_response({"now": state.clock.now()})


async def set_credits(request: web.Request) -> web.Response:
    """Set a key's remaining balance: `{"api_key": "...", "remaining_credits": N}`."""
    body = await _body(request)
    request.app[STATE].accounts.set_credits(str(body["api_key"]), float(body["remaining_credits"]))
    return json_response({"ok": True})


async def revoke(request: web.Request) -> web.Response:
    """Revoke a key: `{"api_key": "..."}`; every call with it is 401 from now on."""
    body = await _body(request)
    request.app[STATE].accounts.revoke(str(body["api_key"]))
    return json_response({"ok": True})


async def file(request: web.Request) -> web.Response:
    """A result image or an uploaded file; 404 once expired or deleted."""
    state = request.app[STATE]
    tail, now = request.match_info["tail"], request[NOW]
    headers = {"Cache-Control": "private, max-age=86400"}
    result = state.tasks.result(tail, now)
    if result is not None:
        task, index = result
        body, content_type = render_png(task.prompt, task.size, index, task.image_fault, task.generation,
                                     task.idempotency_key or ""), "image/png"
        name = tail.rsplit("/", 1)[-1]
    else:
        stored = state.files.lookup(tail, now)
        if stored is None:
            return api_error(404, "file_not_found", "File not found or expired.")
        body, content_type, name = stored.data, stored.mime_type, stored.file_name
    if request.query.get("download"):
        headers["Content-Disposition"] = f'attachment; filename="{name}"'
    state.stats.downloads += 1
    return web.Response(body=body, content_type=content_type, headers=headers)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/_emulator/stats", stats)
    app.router.add_get("/_emulator/tasks", tasks)
    app.router.add_post("/_emulator/tasks/{task_id}/cancel", cancel)
    app.router.add_get("/_emulator/uploads", uploads)
    app.router.add_post("/_emulator/advance", advance)
    app.router.add_post("/_emulator/credits", set_credits)
    app.router.add_post("/_emulator/revoke", revoke)
    app.router.add_get("/_emulator/files/{tail:.+}", file)
