"""The image API's routes: create a task, poll one, poll many, read the balance.

Each handler follows the reference and API_CONTRACT.md: same paths, field names, status codes and error
bodies. Authentication and the rate limit happened before (app.py's gateway); the key is `request[KEY]`.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from batchgen import catalog
from batchgen.emulator.faults import HttpFault, HttpFaults
from batchgen.emulator.responses import DEFAULT_MESSAGES, api_error, files_error, json_response
from batchgen.emulator.state import EmulatorState, IdempotentSubmit
from batchgen.emulator.tasks import TASK_ID_PREFIX
from batchgen.emulator.validation import InvalidRequest, parse_generation
from batchgen.models import GenerationRequest, canonical_json

STATE: web.AppKey[EmulatorState] = web.AppKey("emulator_state", EmulatorState)
KEY = "batchgen_api_key"  # request[KEY]: the caller's API key, set by the gateway
NOW = "batchgen_now"  # request[NOW]: the clock reading the gateway settled tasks at
DROPPED = "batchgen_dropped"  # request[DROPPED]: the connection was closed without an answer

IDEMPOTENCY_KEY_RE = re.compile(r"[A-Za-z0-9._-]{16,96}")
MAX_BATCH_IDS = 50
FILES_PREFIX = "/_emulator/files/"


def origin(request: web.Request) -> str:
    """Base of URLs the emulator hands out, as the client reached it."""
    return f"{request.scheme}://{request.host}"


def drop(request: web.Request) -> web.Response:
    """Close the connection without answering (the response below is never written)."""
    if request.transport is not None:
        request.transport.close()
    request[DROPPED] = True
    return web.Response(status=499)


def injected(request: web.Request, fault: HttpFault, where: str, envelope: bool) -> web.Response | None:
    """Apply a random request-level fault drawn for `where` ("submit", "poll", "upload")."""
    state = request.app[STATE]
    state.stats.faults[f"{where}.{fault.kind if fault.kind != 'status' else fault.status}"] += 1
    if fault.kind == "drop":
        return drop(request)
    if fault.kind == "drop_after":
        return None
    return http_fault(state, fault.status, envelope)


def http_fault(state: EmulatorState, status: int, envelope: bool = False) -> web.Response:
    """An injected HTTP error; 429 and 503 carry a (scaled) Retry-After."""
    retry_after = None
    if status in (429, 503):
        retry_after = state.clock.report_s(state.clock.real_s(state.config.faults.retry_after_s))
    if envelope:
        return files_error(status, status, DEFAULT_MESSAGES.get(status, "Error."), retry_after=retry_after)
    return api_error(status, retry_after=retry_after)


def draw_fault(request: web.Request, which: HttpFaults, where: str,
               envelope: bool = False) -> tuple[web.Response | None, bool]:
    """(a response that replaces the answer, whether to drop the connection after answering)."""
    fault = request.app[STATE].faults.draw(which)
    if fault is None:
        return None, False
    return injected(request, fault, where, envelope), fault.kind == "drop_after"


async def read_json(request: web.Request, limit: int) -> Any:
    """The JSON body, or raise InvalidRequest / a 413 response."""
    if request.content_length is not None and request.content_length > limit:
        raise _TooLarge()
    raw = await request.read()
    if len(raw) > limit:
        raise _TooLarge()
    try:
        return json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("The request body is not valid JSON.", None) from None


class _TooLarge(Exception):
    pass


async def create_task(request: web.Request) -> web.Response:
    state = request.app[STATE]
    key = request[KEY]
    answer, drop_after = draw_fault(request, state.config.faults.submit, "submit")
    if answer is not None:
        return answer

    idem = request.headers.get("Idempotency-Key") if state.config.idempotency else None
    if idem is not None and not IDEMPOTENCY_KEY_RE.fullmatch(idem):
        return api_error(400, "invalid_idempotency_key", "Idempotency-Key must be 16-96 characters of "
                         "A-Z, a-z, 0-9, '.', '_' and '-'.", param="Idempotency-Key")
    try:
        body = await read_json(request, state.config.max_request_bytes)
        if idem is not None:
            body_hash = hashlib.sha256(canonical_json(body).encode()).hexdigest()
            earlier = state.idempotency.get((key, idem))
            if earlier is not None:
                if earlier.body_hash != body_hash:
                    state.stats.idempotency_conflicts += 1
                    return api_error(409, "idempotency_conflict", "This Idempotency-Key was used with a "
                                     "different request body.", param="Idempotency-Key")
                state.stats.idempotent_replays += 1
                task = state.tasks.tasks[earlier.task_id]
                return json_response(state.tasks.view(task, request[NOW], origin(request)),
                                     headers={"Idempotency-Replayed": "true"})
        generation = parse_generation(body)
    except InvalidRequest as problem:
        return api_error(400, "invalid_parameter" if problem.param else "invalid_request", problem.message,
                         param=problem.param, fallback_suggestion=problem.fallback_suggestion)
    except _TooLarge:
        return api_error(413)

    forced = state.faults.match(generation.prompt, generation.model)
    if forced is not None:
        state.stats.faults[f"rule.{forced}"] += 1
        if isinstance(forced, int):
            return http_fault(state, forced)
        if forced == "drop":
            return drop(request)
        if forced == "drop_after":
            drop_after, forced = True, None

    price = catalog.MODELS[generation.model].credits_for(generation.n)
    if not state.accounts.reserve(key, price):
        return api_error(402, "insufficient_user_quota", f"Insufficient credits: this task needs {price:g}, "
                         f"the balance is {state.accounts.balance(key).remaining:g}.")
    task = state.tasks.create(key, generation, request[NOW], idempotency_key=idem, forced=forced,
                              refs_ok=_references_ok(request, generation))
    state.stats.account_tasks[state.accounts.account_id(key)] += 1
    state.accounts.task_created(key)
    if idem is not None:
        state.idempotency[(key, idem)] = IdempotentSubmit(body_hash, task.id)
    if drop_after:
        return drop(request)
    return json_response(state.tasks.view(task, request[NOW], origin(request)))


_REFERENCE_MIME_TYPES = frozenset(f"image/{fmt.lower()}" for fmt in catalog.REFERENCE_IMAGE_FORMATS)


def _references_ok(request: web.Request, generation: GenerationRequest) -> bool:
    """False when an image reference cannot be used: not a URL; an emulator file URL (an upload or a
    result) that expired, was deleted or never existed; an upload of another account (files belong to the
    account that uploaded them); or an upload the reference does not allow as an input image (GIF, over
    4 MB). Other hosts' URLs are trusted unchecked."""
    state = request.app[STATE]
    now = request[NOW]
    refs = [*generation.image_urls, *([generation.mask_url] if generation.mask_url else [])]
    for ref in refs:
        parts = urlsplit(ref)
        if parts.scheme not in ("http", "https"):
            return False
        if parts.netloc == request.host and parts.path.startswith(FILES_PREFIX):
            tail = parts.path[len(FILES_PREFIX):]
            upload = state.files.lookup(tail, now)
            if upload is not None:
                if upload.key != request[KEY]:
                    state.stats.cross_account_references += 1
                    return False
                too_big = len(upload.data) > catalog.MAX_REFERENCE_IMAGE_BYTES
                if upload.mime_type not in _REFERENCE_MIME_TYPES or too_big:
                    return False
            elif state.tasks.result(tail, now) is None:
                return False
    return True


async def get_task(request: web.Request) -> web.Response:
    state = request.app[STATE]
    answer, drop_after = draw_fault(request, state.config.faults.poll, "poll")
    if answer is not None:
        return answer
    state.stats.polls += 1
    task_id = request.match_info["task_id"]
    if not task_id.startswith(TASK_ID_PREFIX):
        return api_error(400, "invalid_task_id", f"Invalid task id: {task_id[:100]}", param="task_id")
    task = state.tasks.get(task_id, request[KEY])
    if task is None:
        state.stats.tasks_not_found += 1
        return api_error(404, "task_not_found", "Task not found.")
    if drop_after:
        return drop(request)
    return json_response(state.tasks.view(task, request[NOW], origin(request)))


async def get_tasks(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not state.config.batch_poll:
        return api_error(404)
    answer, drop_after = draw_fault(request, state.config.faults.poll, "poll")
    if answer is not None:
        return answer
    try:
        body = await read_json(request, state.config.max_request_bytes)
    except InvalidRequest as problem:
        return api_error(400, "invalid_request", problem.message)
    except _TooLarge:
        return api_error(413)
    ids = body.get("task_ids") if isinstance(body, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        return api_error(400, "invalid_parameter", "task_ids must be an array of task id strings.",
                         param="task_ids")
    if len(ids) > MAX_BATCH_IDS:
        return api_error(400, "invalid_parameter", f"At most {MAX_BATCH_IDS} task_ids per call.",
                         param="task_ids")
    state.stats.batch_polls += 1
    state.stats.polls += len(ids)
    key, now, base = request[KEY], request[NOW], origin(request)
    data = []
    for task_id in dict.fromkeys(ids):
        task = state.tasks.get(task_id, key)
        if task is not None:
            data.append(state.tasks.view(task, now, base))
        else:
            state.stats.tasks_not_found += 1
    if drop_after:
        return drop(request)
    return json_response({"data": data})


async def credits(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not state.config.credits_endpoint:
        return api_error(404)
    balance = state.accounts.balance(request[KEY])
    remaining, used = round(balance.remaining, 4), round(balance.used, 4)
    return json_response({"success": True, "data": {
        "user": {"remaining_credits": remaining, "used_credits": used},
        "token": {"remaining_credits": remaining, "used_credits": used, "unlimited_credits": False},
    }})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/images/generations", create_task)
    # Before the {task_id} route, so "batch" is never read as a task id.
    app.router.add_post("/v1/tasks/batch", get_tasks)
    app.router.add_get("/v1/tasks/{task_id}", get_task)
    app.router.add_get("/v1/credits", credits)


__all__ = ["DROPPED", "KEY", "NOW", "STATE", "add_routes", "draw_fault", "drop", "origin"]
