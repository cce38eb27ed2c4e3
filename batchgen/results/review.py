"""`batchgen review`: the contact sheet served on 127.0.0.1, where a person approves or rejects images.

The page is the report's (sheet.py gathers, render.py renders), with two buttons per tile and the keys
`a` (approve) and `r` (reject); an optional reason typed in the toolbar goes with the next decision.
Decisions go straight into the store (`store.reviews.decide`, the `reviews` table, with time and reason);
the next `batchgen run` regenerates the rejected images (engine/rejects.py). Deciding the same thing twice
changes nothing; a decision on an image that was replaced meanwhile is refused with 409 and a message.

Who can reach it: the server binds to 127.0.0.1 unless told otherwise, and every request must carry the
random token printed in the URL (`?token=` on pages and images, the `X-Batchgen-Token` header on
decisions); anything else gets 403. Decisions are only accepted as JSON with that header, from a page of
the same origin (a cross-site form can set neither a custom header nor a JSON content type without a
CORS preflight, which this server never grants), and the Host header must name this server, so a
hostile page cannot reach it by DNS rebinding either. Tokens are compared in constant time.

Routes (all need the token): `GET /` the page; `GET /thumb/{key}/{idx}/{sha}.jpg` a thumbnail (made on
first use in a temporary folder); `GET /image/{key}/{idx}/{sha}` the full image; `POST /api/review`
`{request_key, idx, sha256, decision: approve|reject, reason}` -> `{review, reason}` (200), 409 when the
image is superseded, 400 for a malformed body.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import tempfile
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from batchgen.errors import ConfigError, listen_error
from batchgen.results.render import render_sheet
from batchgen.results.report import make_thumbnail, thumb_name
from batchgen.results.sheet import REVIEW_LABELS, Tile, gather
from batchgen.storage.local import safe_target
from batchgen.store.base import BaseStore as Store
from batchgen.store.open import open_store
from batchgen.store.records import ReviewRefusedError

TOKEN_HEADER = "X-Batchgen-Token"
DEFAULT_HOST = "127.0.0.1"
MAX_REASON_CHARS = 500

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
STORE = web.AppKey("store", Store)
CONFIG = web.AppKey("config", dict)


def new_token() -> str:
    return secrets.token_urlsafe(24)


def _forbidden(message: str) -> web.Response:
    return web.json_response({"error": message}, status=403)


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    cfg = request.app[CONFIG]
    if request.host not in cfg["hosts"]:
        return _forbidden("unknown Host header")
    token = request.headers.get(TOKEN_HEADER) if request.method == "POST" else request.query.get("token")
    if not token or not secrets.compare_digest(token, cfg["token"]):
        return _forbidden("a valid token is required: open the URL batchgen review printed")
    if request.method == "POST":
        origin = request.headers.get("Origin")
        if origin is not None and origin not in cfg["origins"]:
            return _forbidden("cross-origin requests are not accepted")
        if request.content_type != "application/json":
            return _forbidden("decisions are JSON")
    response = await handler(request)
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"  # the token is in the page's URLs
    response.headers["X-Frame-Options"] = "DENY"
    return response


def _image_path(request: web.Request) -> Path:
    """The current image behind /{key}/{idx}/{sha}, looked up in the store (never a path from the URL)."""
    store = request.app[STORE]
    key, sha = request.match_info["key"], request.match_info["sha"]
    try:
        idx = int(request.match_info["idx"])
    except ValueError:
        raise web.HTTPNotFound() from None
    img = next((i for i in store.images_for(key) if i.idx == idx), None)
    if img is None or img.sha256 != sha:
        raise web.HTTPNotFound(text="this image has been replaced; reload the page")
    try:
        return safe_target(request.app[CONFIG]["images_dir"], img.path)
    except ValueError:
        raise web.HTTPNotFound() from None


async def _page(request: web.Request) -> web.Response:
    store, cfg = request.app[STORE], request.app[CONFIG]
    sheet = gather(store, cfg["images_dir"])
    q = urllib.parse.urlencode({"token": cfg["token"]})

    def ident(t: Tile) -> str:
        return "/".join(urllib.parse.quote(str(p), safe="") for p in (t.request_key, t.idx, t.sha256))

    page = render_sheet(sheet, mode="review", db_name=cfg["db_name"],
                        thumb_url=lambda t: f"/thumb/{ident(t)}.jpg?{q}",
                        full_url=lambda t: f"/image/{ident(t)}?{q}",
                        data={"token": cfg["token"], "endpoint": "/api/review"})
    return web.Response(text=page, content_type="text/html", charset="utf-8")


async def _thumb(request: web.Request) -> web.StreamResponse:
    src = _image_path(request)
    dst = request.app[CONFIG]["thumbs"] / thumb_name(request.match_info["sha"])
    try:
        await asyncio.to_thread(make_thumbnail, src, dst)
    except OSError:
        raise web.HTTPNotFound(text="the image file is missing or unreadable") from None
    return web.FileResponse(dst, headers={"Content-Type": "image/jpeg"})


async def _image(request: web.Request) -> web.StreamResponse:
    path = _image_path(request)
    if not path.is_file():
        raise web.HTTPNotFound(text="the image file is missing")
    return web.FileResponse(path)


async def _decide(request: web.Request) -> web.Response:
    try:
        body = await request.json()
        key, idx, sha = str(body["request_key"]), int(body["idx"]), str(body["sha256"])
        decision = str(body["decision"])
        reason = body.get("reason") or None
    except (ValueError, KeyError, TypeError):
        return web.json_response({"error": "expected JSON {request_key, idx, sha256, decision, reason}"}, status=400)
    if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS):
        return web.json_response({"error": f"reason: text of at most {MAX_REASON_CHARS} characters"}, status=400)
    try:
        rv = request.app[STORE].reviews.decide(key, idx, sha, decision, reason)
    except ReviewRefusedError as error:
        return web.json_response({"error": str(error)}, status=409 if error.superseded else 400)
    return web.json_response({"review": REVIEW_LABELS[rv.decision], "reason": rv.reason or "",
                              "decided_at": rv.decided_at})


def make_app(store: Store, images_dir: Path, token: str, thumbs: Path, hosts: set[str],
             db_name: str) -> web.Application:
    """The review app; `hosts` are the Host header values that name this server ("127.0.0.1:8765", ...)."""
    app = web.Application(middlewares=[_guard], client_max_size=64 * 1024)
    app[STORE] = store
    app[CONFIG] = {"images_dir": images_dir, "token": token, "thumbs": thumbs, "hosts": hosts,
                   "origins": {f"http://{h}" for h in hosts}, "db_name": db_name}
    app.router.add_get("/", _page)
    app.router.add_get("/thumb/{key}/{idx}/{sha}.jpg", _thumb)
    app.router.add_get("/image/{key}/{idx}/{sha}", _image)
    app.router.add_post("/api/review", _decide)
    return app


def host_names(host: str, port: int) -> set[str]:
    names = {f"{host}:{port}"}
    if host in ("127.0.0.1", "localhost", "::1"):
        names |= {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"}
    return names


class ReviewServer:
    """`async with ReviewServer(db_path) as srv:` serves on `srv.url` (token included) until the block ends."""

    def __init__(self, db_path: Path | str, *, host: str = DEFAULT_HOST, port: int = 0, token: str | None = None,
                 out_dir: Path | None = None, job_name: str | None = None) -> None:
        self.db_path = db_path  # a file, or a postgresql:// URL
        self.job_name = job_name
        self.host, self.port = host, port
        self.token = token or new_token()
        self.out_dir = out_dir
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._store: Store | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    async def __aenter__(self) -> ReviewServer:
        store = self._store = open_store(self.db_path, self.job_name)
        job = store.job_record() or {}
        db_name = Path(str(store.location)).name  # a shared store's URL carries no password here
        location = str(self.out_dir or job.get("output_dir") or Path(str(self.db_path)).parent)
        if location.startswith("s3://"):
            store.close()
            self._store = None
            raise ConfigError(f"batchgen review serves images from a local folder; this job's are in {location}. "
                              "Use batchgen report (in the bucket, or -o FILE with presigned links) to look "
                              "at them, or pass the folder of a local copy")
        images_dir = Path(location).resolve()
        self._tmp = tempfile.TemporaryDirectory(prefix="batchgen-review-")
        # The Host check needs the real port, known only once bound: the app reads the set it was given.
        hosts: set[str] = set()
        app = make_app(store, images_dir, self.token, Path(self._tmp.name), hosts, db_name)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as error:
            await self.__aexit__(None, None, None)
            raise listen_error(self.host, self.port, error) from None
        self.port = int(self._runner.addresses[0][1])
        hosts |= host_names(self.host, self.port)
        app[CONFIG]["origins"] |= {f"http://{h}" for h in hosts}
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{shown}:{self.port}/?token={self.token}"
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def serve(db_path: Path | str, *, host: str, port: int, on_ready: Callable[[str], None],
          job_name: str | None = None) -> None:
    """Serve until Ctrl-C / SIGTERM (blocking); `on_ready(url)` once it listens."""

    async def main() -> None:
        async with ReviewServer(db_path, host=host, port=port, job_name=job_name) as server:
            on_ready(server.url)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()

    asyncio.run(main())
