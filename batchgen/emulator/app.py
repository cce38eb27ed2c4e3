"""The aiohttp application: the gateway every request passes, and the three route sets behind it.

The gateway does what the real service's front door does before any handler runs — authenticate the
Bearer key and apply the per-key rate limit on API routes (/v1/ and /api/v1/) — and what only an emulator
does: settle tasks that ended, count every request by route and status, and turn aiohttp's own 404/405/413
into the API's error bodies so a client never sees a body shape the real API would not send.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from batchgen.emulator import api_routes, control_routes, files_routes
from batchgen.emulator.api_routes import DROPPED, KEY, NOW, STATE
from batchgen.emulator.config import EmulatorConfig
from batchgen.emulator.files_routes import HTTP_SESSION
from batchgen.emulator.responses import DEFAULT_MESSAGES, api_error, files_error
from batchgen.emulator.state import EmulatorState

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_request_ids = itertools.count(1)


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return f"{request.method} {resource.canonical if resource is not None else '(no route)'}"


def _refuse(state: EmulatorState, status: int, files: bool, code: int | str, message: str,
            retry_after: float | None = None) -> web.Response:
    if files:
        return files_error(status, status, message, as_200=False, retry_after=retry_after)
    return api_error(status, code, message, retry_after=retry_after)


def _admit(request: web.Request, state: EmulatorState, files: bool) -> web.Response | None:
    """Authentication, then the rate limit; None lets the request through."""
    key = state.accounts.authenticate(request.headers.get("Authorization"))
    if key is None:
        return _refuse(state, 401, files, 401, "Invalid API key. Send Authorization: Bearer <key>.")
    account = state.accounts.account_id(key)
    state.stats.account_request(account)
    if state.limiter is not None:
        wait_s = state.limiter.check(key)
        if wait_s is not None:
            state.stats.rate_limited += 1
            state.stats.account_rate_limited[account] += 1
            return _refuse(state, 429, files, 429, "Rate limit exceeded. Retry after the Retry-After delay.",
                           # Real seconds (the limit is on real time), fractional unless the scale is 1.
                           retry_after=state.clock.report_s(wait_s))
    request[KEY] = key
    return None


@web.middleware
async def gateway(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    now = state.clock.now()
    request[NOW] = now
    state.tasks.settle(now)
    path = request.path
    files = path.startswith("/api/v1/")
    api = files or path.startswith("/v1/")
    try:
        if api:
            state.stats.api_request()
            response = _admit(request, state, files) or await handler(request)
        else:
            response = await handler(request)
    except web.HTTPException as exc:
        if not api:
            state.stats.request(_route_name(request), str(exc.status))
            raise
        message = DEFAULT_MESSAGES.get(exc.status, exc.reason)
        response = (files_error(exc.status, exc.status, message) if files
                    else api_error(exc.status, message=message))
    if request.get(DROPPED):
        state.stats.dropped_connections += 1
        state.stats.request(_route_name(request), "dropped")
    else:
        state.stats.request(_route_name(request), str(response.status))
        if api:
            state.stats.api_answered(response.status, request.method == "POST" and path == "/v1/images/generations")
        response.headers["X-Request-Id"] = f"req-emu-{next(_request_ids):08x}"
    return response


def make_app(config: EmulatorConfig) -> web.Application:
    state = EmulatorState(config)
    # Base64 uploads are a third larger than the file; everything else is capped per route.
    app = web.Application(middlewares=[gateway],
                          client_max_size=config.max_upload_bytes * 4 // 3 + 1024 * 1024)
    app[STATE] = state
    api_routes.add_routes(app)
    files_routes.add_routes(app)
    control_routes.add_routes(app)

    async def http_session(app: web.Application) -> AsyncIterator[None]:
        # For URL uploads; created inside the running loop, closed with the app.
        async with aiohttp.ClientSession(headers={"User-Agent": "batchgen-emulator"}) as session:
            app[HTTP_SESSION] = session
            yield

    app.cleanup_ctx.append(http_session)
    return app
