"""The Evolink HTTP client: the one boundary between batchgen and the network.

Everything batchgen says to the Evolink image API, the Files API and the media hosts that serve results
goes through `EvolinkClient`. It does three jobs and nothing more:

* speak the wire contract (`API_CONTRACT.md`): paths, compact JSON bodies, the bearer key, a product
  User-Agent, `Idempotency-Key` on submits, the Files API envelope;
* hand back the answers as the small frozen records of `api/answers.py` (`TaskSnapshot`, `UploadedFile`,
  `Credits`, `Quota`, `Downloaded`), which read however loosely the server fills its fields;
* turn every failure into one of our errors (`errors.py`), at this one place::

      aiohttp ClientError, asyncio timeout, payload error  ─┐
      HTTP 200 whose body is not a JSON object             ─┴─► TransportError (status None, or 200)
      API non-2xx                                          ───► HttpError(status, code, retry_after_s, ...)
      Files API non-2xx, or HTTP 200 with success=false    ───► FilesApiError(status, code "40003", ...)

It never retries and never sleeps: whether and when to try again is `errors.decide()`'s call, applied by
the scheduler. The only pacing here is the optional `AdaptiveLimiter`: every API call waits for it first
(task and batch polls in its poll lane, everything else in its submit lane), a 429 penalises it and a 2xx
rewards it, so the whole run slows down together when the server pushes back.

The API key is sent only in the `Authorization` header of API and Files API calls, never to a media host
(downloads go out without it, whatever the URL), and it is scrubbed from every message and body excerpt
we build, in case a server echoes it back.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import mimetypes
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

import aiohttp

from batchgen import __version__
from batchgen.api.answers import (
    EXCERPT_CHARS,
    Credits,
    Downloaded,
    Quota,
    TaskSnapshot,
    UploadedFile,
    code_str,
    error_fields,
    excerpt,
    number,
    retry_after_s,
)
from batchgen.errors import ApiError, ConnectError, FilesApiError, HttpError, TransportError

if TYPE_CHECKING:
    from batchgen.engine.ratelimit import AdaptiveLimiter, Lane

log = logging.getLogger(__name__)

DEFAULT_USER_AGENT = f"batchgen/{__version__}"
MAX_BATCH_IDS = 50  # the batch poll route takes at most this many ids per call
DEFAULT_MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024
_IDEMPOTENCY_KEY_RE = re.compile(r"^[A-Za-z0-9._-]{16,96}$")
# Compact JSON, as the API itself answers (aiohttp's json= adds spaces); built once, not per call.
_BODY_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_DOWNLOAD_CHUNK_BYTES = 64 * 1024

Api = Literal["api", "files"]


# --- the client -----------------------------------------------------------------------------------


class EvolinkClient:
    """Async client for the Evolink image API and Files API; use as `async with EvolinkClient(...)`.

    The aiohttp session is created in `__aenter__`, inside the running loop (a session made at import or
    in another loop breaks in subtle ways), and closed in `__aexit__`.
    """

    def __init__(
        self,
        api_base: str,
        files_base: str,
        api_key: str,
        *,
        limiter: AdaptiveLimiter | None = None,
        timeout_s: float = 60,
        user_agent: str = DEFAULT_USER_AGENT,
        max_connections: int = 100,
    ) -> None:
        self.api_base = api_base.rstrip("/")
        self.files_base = files_base.rstrip("/")
        self._api_key = api_key
        self.limiter = limiter
        self.timeout_s = timeout_s
        self.user_agent = user_agent
        self.max_connections = max_connections
        # None until the server has answered a batch poll; False after 404/405 (older gateway).
        self.batch_supported: bool | None = None
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        # Never the key.
        return f"<EvolinkClient api_base={self.api_base!r} files_base={self.files_base!r}>"

    async def __aenter__(self) -> EvolinkClient:
        timeout = aiohttp.ClientTimeout(
            # No total: a large upload or download may take long while still making progress. A stalled
            # connect or a silent socket is what we guard against.
            total=None,
            sock_connect=min(self.timeout_s, 15.0),
            sock_read=self.timeout_s,
        )
        self._session = aiohttp.ClientSession(
            timeout=timeout,
            connector=aiohttp.TCPConnector(limit=self.max_connections),
            # No cookies: the API does not use them, and none set by a media host may ride along to it.
            cookie_jar=aiohttp.DummyCookieJar(),
            # Only the User-Agent is a session default: the key is added per API call so that a
            # download can never carry it.
            headers={"User-Agent": self.user_agent},
            raise_for_status=False,
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- generation API ---------------------------------------------------------------------------

    async def submit(self, body: dict[str, Any], idempotency_key: str | None = None, *,
                     on_wire: Callable[[], None] | None = None) -> TaskSnapshot:
        """POST /v1/images/generations. With an `idempotency_key`, a resubmit of the same body returns the
        original task (`replayed=True`) instead of paying twice. `on_wire` is called when the call leaves
        the limiter for the network: from then on the server may create the task, even if no answer comes."""
        headers: dict[str, str] = {}
        if idempotency_key is not None:
            if not _IDEMPOTENCY_KEY_RE.match(idempotency_key):
                raise ValueError("idempotency key must be 16-96 characters of [A-Za-z0-9._-]")
            headers["Idempotency-Key"] = idempotency_key
        resp = await self._call("api", "POST", "/v1/images/generations", json_body=body, headers=headers,
                                on_wire=on_wire)
        replayed = (resp.headers.get("Idempotency-Replayed") or "").strip().lower() == "true"
        return TaskSnapshot.from_json(resp.json_object(), replayed=replayed, request_id=resp.request_id)

    async def get_task(self, task_id: str) -> TaskSnapshot:
        """GET /v1/tasks/{id}; an unknown id is HttpError 404 `task_not_found`."""
        resp = await self._call("api", "GET", f"/v1/tasks/{quote(task_id, safe='')}", lane="poll")
        return TaskSnapshot.from_json(resp.json_object(), request_id=resp.request_id)

    async def get_tasks(self, task_ids: list[str], *, paid: bool = False) -> dict[str, TaskSnapshot]:
        """Poll up to 50 tasks in one call (POST /v1/tasks/batch); unknown ids are absent from the answer.
        `paid`: the caller has already taken the call's turn at the limiter (`limiter.acquire(POLL)`), so
        that it could choose the ids at the last moment.

        Where the server has no batch route (404/405, remembered in `batch_supported`), this falls back
        to single polls, run concurrently under the limiter, with the same meaning: a task the server does
        not know (404) is absent. Any other error is raised, so an id is never reported missing just
        because its poll failed.
        """
        if len(task_ids) > MAX_BATCH_IDS:
            raise ValueError(f"at most {MAX_BATCH_IDS} task ids per batch poll, got {len(task_ids)}")
        if not task_ids:
            return {}
        if self.batch_supported is not False:
            try:
                resp = await self._call("api", "POST", "/v1/tasks/batch", json_body={"task_ids": list(task_ids)},
                                        lane=None if paid else "poll")
            except HttpError as exc:
                if exc.status not in (404, 405):
                    raise
                log.info("server has no batch poll route (HTTP %s); polling tasks one by one", exc.status)
                self.batch_supported = False
            else:
                self.batch_supported = True
                return self._parse_batch(resp)
        return await self._poll_singly(task_ids)

    def _parse_batch(self, resp: _Response) -> dict[str, TaskSnapshot]:
        doc = resp.json_object()
        items = doc.get("data")
        if isinstance(items, dict):
            items = items.get("tasks") or items.get("items")
        if not isinstance(items, list):
            raise TransportError("batch poll answer without a data list", status=resp.status,
                                 request_id=resp.request_id, body_excerpt=self._excerpt(resp.text()))
        snaps = (TaskSnapshot.from_json(item, request_id=resp.request_id) for item in items if isinstance(item, dict))
        return {snap.id: snap for snap in snaps}

    async def _poll_singly(self, task_ids: list[str]) -> dict[str, TaskSnapshot]:
        outcomes = await asyncio.gather(*(self.get_task(t) for t in task_ids), return_exceptions=True)
        found: dict[str, TaskSnapshot] = {}
        first_error: BaseException | None = None
        for task_id, outcome in zip(task_ids, outcomes, strict=True):
            if isinstance(outcome, TaskSnapshot):
                found[task_id] = outcome
            elif isinstance(outcome, HttpError) and outcome.status == 404:
                continue  # unknown task: absent, as in a batch answer
            elif first_error is None:
                first_error = outcome
        if first_error is not None:
            raise first_error
        return found

    async def credits(self) -> Credits | None:
        """GET /v1/credits: the key and the balance, as a preflight check. None where the route does not
        exist (older gateways answer 404/405); a bad key is HttpError 401."""
        try:
            resp = await self._call("api", "GET", "/v1/credits")
        except HttpError as exc:
            if exc.status in (404, 405):
                return None
            raise
        return Credits.from_json(resp.json_object())

    # --- result downloads -------------------------------------------------------------------------

    async def download(self, url: str, max_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES) -> Downloaded:
        """Fetch a result image. No Authorization header, ever (the key must not reach a media host), and
        no limiter: media hosts are not the API. A body over `max_bytes` is refused (HttpError with code
        `download_too_large`, which `decide()` fails rather than retries); image checks are outputs.py's."""
        session = self._require_session()
        try:
            async with session.get(url) as resp:
                request_id = resp.headers.get("X-Request-Id")
                if not 200 <= resp.status < 300:
                    body = await resp.content.read(4096)
                    raise self._http_error("api", resp.status, resp.reason, resp.headers, body)
                declared = resp.content_length
                if declared is not None and declared > max_bytes:
                    raise self._too_large(resp.status, declared, max_bytes, request_id)
                chunks: list[bytes] = []
                total = 0
                async for chunk in resp.content.iter_chunked(_DOWNLOAD_CHUNK_BYTES):
                    total += len(chunk)
                    if total > max_bytes:
                        raise self._too_large(resp.status, total, max_bytes, request_id)
                    chunks.append(chunk)
                content_type = resp.headers.get("Content-Type")
                mime = content_type.split(";", 1)[0].strip().lower() if content_type else None
                return Downloaded(data=b"".join(chunks), content_type=mime or None, url=url)
        except ApiError:
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._transport_error(exc, "GET", _host_only(url)) from exc

    def _too_large(self, status: int, size: int, max_bytes: int, request_id: str | None) -> HttpError:
        return HttpError(
            f"download is larger than {max_bytes} bytes ({size}+)",
            status=status,
            code="download_too_large",
            request_id=request_id,
        )

    # --- Files API --------------------------------------------------------------------------------

    async def upload_file(self, path: Path, file_name: str | None = None) -> UploadedFile:
        """Stream a local file (multipart part `file`); the content type comes from its magic bytes."""
        path = Path(path)
        name = file_name or path.name
        with path.open("rb") as fh:
            head = fh.read(16)
            fh.seek(0)
            # quote_fields=False: aiohttp would otherwise percent-encode the filename ("a%20b.png"), and
            # servers (the emulator's aiohttp among them) keep that as the name. Browsers send it raw too.
            form = aiohttp.FormData(quote_fields=False)
            form.add_field("file", fh, filename=name, content_type=_sniff_mime(head, name))
            if file_name:
                form.add_field("file_name", file_name)
            resp = await self._call("files", "POST", "/api/v1/files/upload/stream", form=form)
        return UploadedFile.from_json(resp.files_data())

    async def upload_base64(self, data: bytes, file_name: str, mime_type: str) -> UploadedFile:
        """Upload bytes as a data: URL (carries the type; the contract accepts raw base64 or a data URL)."""
        encoded = base64.b64encode(data).decode("ascii")
        body = {"base64_data": f"data:{mime_type};base64,{encoded}", "file_name": file_name}
        resp = await self._call("files", "POST", "/api/v1/files/upload/base64", json_body=body)
        return UploadedFile.from_json(resp.files_data())

    async def upload_url(self, url: str) -> UploadedFile:
        """Have the Files API fetch a remote URL (code 40004 when it cannot)."""
        resp = await self._call("files", "POST", "/api/v1/files/upload/url", json_body={"file_url": url})
        return UploadedFile.from_json(resp.files_data())

    async def list_files(self, page: int = 1, page_size: int = 100) -> tuple[int, list[dict[str, Any]]]:
        """One page of the account's files: (total count, file dicts as the server sent them)."""
        resp = await self._call("files", "GET", f"/api/v1/files/list?page={int(page)}&pageSize={int(page_size)}")
        data = resp.files_data()
        files = [f for f in (data.get("files") or []) if isinstance(f, dict)]
        total = number(data.get("total"))
        return (int(total) if total is not None else len(files)), files

    async def quota(self) -> Quota:
        """How many files the account holds and may still upload."""
        data = (await self._call("files", "GET", "/api/v1/files/quota")).files_data()
        used, most, left = (number(data.get(k)) for k in ("used_files", "max_files", "remain_files"))
        used_i = int(used or 0)
        max_i = int(most) if most is not None else used_i + int(left or 0)
        left_i = int(left) if left is not None else max(0, max_i - used_i)
        group = data.get("user_group")
        return Quota(used_files=used_i, max_files=max_i, remain_files=left_i,
                     user_group=group if isinstance(group, str) else None)

    async def delete_file(self, file_id: str) -> None:
        """Delete one of the account's files (FilesApiError 404 when it is already gone)."""
        await self._call("files", "DELETE", f"/api/v1/files/{quote(file_id, safe='')}")

    # --- the one mapping boundary -----------------------------------------------------------------

    async def _call(
        self,
        api: Api,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        form: aiohttp.FormData | None = None,
        headers: Mapping[str, str] | None = None,
        lane: Lane | None = "submit",
        on_wire: Callable[[], None] | None = None,
    ) -> _Response:
        """Send one API call and return its 2xx answer, or raise the mapped error.

        Waits for the limiter first, in the call's lane (polls go ahead of submissions; credits and the
        Files API share the submissions' lane); a 429 penalises it (with the server's Retry-After) before raising,
        a 2xx rewards it. Bodies are read in full here so that every error, including one while reading,
        is mapped at this one place.
        """
        session = self._require_session()
        base = self.api_base if api == "api" else self.files_base
        send_headers = {"Authorization": f"Bearer {self._api_key}", "Accept": "application/json"}
        if headers:
            send_headers.update(headers)
        data: Any = None
        if json_body is not None:
            data = _BODY_ENCODER.encode(json_body).encode("utf-8")
            send_headers["Content-Type"] = "application/json"
        elif form is not None:
            data = form
        if self.limiter is not None and lane is not None:  # None: the caller took the turn already
            await self.limiter.acquire(lane)
        if on_wire is not None:
            on_wire()
        try:
            async with session.request(method, base + path, data=data, headers=send_headers) as resp:
                body = await resp.read()
                status, reason, resp_headers = resp.status, resp.reason, resp.headers
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._transport_error(exc, method, path) from exc
        request_id = resp_headers.get("X-Request-Id")
        log.debug("%s %s -> HTTP %s (request id %s)", method, path, status, request_id)
        if status == 429 and self.limiter is not None:
            self.limiter.penalize(retry_after_s(resp_headers.get("Retry-After")))
        if not 200 <= status < 300:
            raise self._http_error(api, status, reason, resp_headers, body)
        if self.limiter is not None:
            self.limiter.reward()
        answer = _Response(status, resp_headers, body, request_id, self)
        if api == "files":
            answer.check_files_envelope()
        return answer

    def _http_error(
        self, api: Api, status: int, reason: str | None, headers: Mapping[str, str], body: bytes
    ) -> ApiError:
        """A non-2xx answer as HttpError (or FilesApiError), whatever shape its body has."""
        text = body.decode("utf-8", errors="replace")
        code, message = error_fields(text)
        if not message:
            what = "empty body" if not text.strip() else "no error message in the body"
            message = f"{reason or 'HTTP error'} ({what})"
        cls = FilesApiError if api == "files" else HttpError
        return cls(
            self._redact(message)[:EXCERPT_CHARS],
            status=status,
            code=self._redact(code) if code else None,
            retry_after_s=retry_after_s(headers.get("Retry-After")),
            request_id=headers.get("X-Request-Id"),
            body_excerpt=self._excerpt(text) or None,
        )

    def _transport_error(self, exc: BaseException, method: str, where: str) -> TransportError:
        detail = str(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError) and not str(exc):
            detail = f"timed out after {self.timeout_s:g} s without an answer"
        message = self._redact(f"{method} {where}: {type(exc).__name__}: {detail}")
        if isinstance(exc, aiohttp.ClientConnectorError):  # refused, DNS, unreachable: nothing was sent
            return ConnectError(message[:EXCERPT_CHARS])
        return TransportError(message[:EXCERPT_CHARS])

    def _redact(self, text: str) -> str:
        """Scrub the key from anything we put in an error (a server may echo it back)."""
        if self._api_key and self._api_key in text:
            text = text.replace(self._api_key, "[redacted]")
        return text

    def _excerpt(self, text: str) -> str:
        return self._redact(excerpt(text))

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("EvolinkClient must be used as `async with EvolinkClient(...) as client`")
        return self._session


class _Response:
    """A 2xx answer, read in full; its JSON is decoded once, on demand."""

    def __init__(
        self, status: int, headers: Mapping[str, str], body: bytes, request_id: str | None, client: EvolinkClient
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.request_id = request_id
        self._client = client
        self._doc: dict[str, Any] | None = None

    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json_object(self) -> dict[str, Any]:
        """The body as a JSON object; anything else on a 2xx is a broken answer (TransportError, retried)."""
        if self._doc is None:
            try:
                doc = json.loads(self.body)
            except ValueError:
                doc = None
            if not isinstance(doc, dict):
                raise TransportError(
                    "malformed answer: the body is not a JSON object",
                    status=self.status,
                    request_id=self.request_id,
                    body_excerpt=self._client._excerpt(self.text()) or None,
                )
            self._doc = doc
        return self._doc

    def check_files_envelope(self) -> None:
        """The Files API may say no with HTTP 200 and `success: false`."""
        if not self.body.strip():
            return  # DELETE may answer with an empty body
        doc = self.json_object()
        if doc.get("success") is False:
            code = doc.get("code")
            message = doc.get("msg") or doc.get("message") or "the Files API refused the request"
            raise FilesApiError(
                self._client._redact(str(message))[:EXCERPT_CHARS],
                status=self.status,
                code=code_str(code),
                request_id=self.request_id,
                body_excerpt=self._client._excerpt(self.text()) or None,
            )

    def files_data(self) -> dict[str, Any]:
        data = self.json_object().get("data")
        if not isinstance(data, dict):
            raise TransportError(
                "Files API answer without a data object",
                status=self.status,
                request_id=self.request_id,
                body_excerpt=self._client._excerpt(self.text()) or None,
            )
        return data


_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
          (b"GIF89a", "image/gif"))


def _sniff_mime(head: bytes, name: str) -> str:
    """The part's content type from the file's first bytes; the name's extension only as a fallback."""
    for magic, mime in _MAGIC:
        if head.startswith(magic):
            return mime
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def _host_only(url: str) -> str:
    """A media URL for an error message without its query (signed URLs carry tokens there)."""
    return url.split("?", 1)[0][:200]
