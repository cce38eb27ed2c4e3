"""The Files API's storage: uploads kept in memory per key, with a quota and an expiry.

Only images are accepted, judged by their first bytes (JPEG, PNG, GIF, WebP), never by name or declared
type. An upload lives for 72 emulated hours (scaled), after which its URL answers 404, it leaves the list
and stops counting against the quota. The HTTP side is files_routes.py.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from batchgen.emulator.accounts import Accounts
from batchgen.emulator.clock import Clock
from batchgen.emulator.config import EmulatorConfig
from batchgen.emulator.stats import Stats

# Files API error codes (API_CONTRACT.md).
TOO_LARGE = 40001
TYPE_NOT_ALLOWED = 40002
QUOTA_EXCEEDED = 40003
URL_DOWNLOAD_FAILED = 40004

_EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/gif": "gif", "image/webp": "webp"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def sniff_mime(data: bytes) -> str | None:
    """The image type from magic bytes, or None for anything the Files API refuses."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def iso8601(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class FilesProblem(Exception):
    """An upload refused with a Files API code (40001...) and message."""

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


@dataclass(slots=True, eq=False)
class StoredFile:
    file_id: str
    key: str
    file_name: str
    original_name: str
    mime_type: str
    upload_path: str
    data: bytes
    sha256: str
    uploaded: float
    expires: float
    tail: str  # path under /_emulator/files/
    deleted: bool = False

    def live(self, now: float) -> bool:
        return not self.deleted and now < self.expires

    def record(self, origin: str) -> dict[str, Any]:
        """The upload's `data` object, as the upload routes answer it."""
        url = f"{origin}/_emulator/files/{self.tail}"
        return {
            "file_id": self.file_id,
            "file_name": self.file_name,
            "original_name": self.original_name,
            "file_size": len(self.data),
            "mime_type": self.mime_type,
            "upload_path": self.upload_path,
            "file_url": url,
            "download_url": url + "?download=1",
            "upload_time": iso8601(self.uploaded),
            "expires_at": iso8601(self.expires),
        }


class FileStore:
    def __init__(self, config: EmulatorConfig, clock: Clock, accounts: Accounts, stats: Stats) -> None:
        self.config = config
        self.clock = clock
        self.accounts = accounts
        self.stats = stats
        self.files: dict[str, StoredFile] = {}
        self._by_tail: dict[str, StoredFile] = {}
        self._rng = random.Random(None if config.seed is None else f"files|{config.seed}")

    def check_size(self, size: int) -> None:
        if size > self.config.max_upload_bytes:
            raise FilesProblem(TOO_LARGE, f"File too large: {size} bytes (max {self.config.max_upload_bytes}).")

    def add(self, key: str, data: bytes, *, original_name: str | None, file_name: str | None,
            upload_path: str | None) -> StoredFile:
        """Store one upload, or FilesProblem (too large, not an image, quota full)."""
        self.check_size(len(data))
        mime = sniff_mime(data)
        if mime is None:
            raise FilesProblem(TYPE_NOT_ALLOWED, "File type not allowed: only JPEG, PNG, GIF and WebP images.")
        now = self.clock.now()
        if len(self.active(key, now)) >= self.config.files_quota:
            raise FilesProblem(QUOTA_EXCEEDED, f"File quota exceeded ({self.config.files_quota} files).")
        file_id = f"file_{self._rng.getrandbits(96):024x}"
        ext = _EXTENSIONS[mime]
        name = _safe_name(file_name) or f"{int(now)}_{file_id[-8:]}.{ext}"
        path = "/".join(_safe_name(p) for p in (upload_path or "uploads").split("/") if _safe_name(p)) or "uploads"
        stored = StoredFile(
            file_id=file_id, key=key, file_name=name, original_name=original_name or name, mime_type=mime,
            upload_path=path, data=data, sha256=hashlib.sha256(data).hexdigest(), uploaded=now,
            expires=now + self.clock.real_s(self.config.upload_ttl_s),
            tail=f"{self.accounts.account_id(key)}/{path}/{file_id}/{name}",
        )
        self.files[file_id] = stored
        self._by_tail[stored.tail] = stored
        self.stats.uploads += 1
        self.stats.uploads_by_sha256[stored.sha256] += 1
        return stored

    def active(self, key: str, now: float) -> list[StoredFile]:
        return [f for f in self.files.values() if f.key == key and f.live(now)]

    def delete(self, key: str, file_id: str, now: float) -> bool:
        stored = self.files.get(file_id)
        if stored is None or stored.key != key or not stored.live(now):
            return False
        stored.deleted = True
        self.stats.files_deleted += 1
        return True

    def lookup(self, tail: str, now: float) -> StoredFile | None:
        """The live upload behind a file URL path."""
        stored = self._by_tail.get(tail)
        return stored if stored is not None and stored.live(now) else None

    def listing(self) -> list[dict[str, Any]]:
        """Every upload ever made, with content hashes, for tests (GET /_emulator/uploads)."""
        now = self.clock.now()
        return [
            {"file_id": f.file_id, "file_name": f.file_name, "original_name": f.original_name,
             "file_size": len(f.data), "mime_type": f.mime_type, "sha256": f.sha256,
             "account": self.accounts.account_id(f.key), "live": f.live(now), "deleted": f.deleted,
             "path": f"/_emulator/files/{f.tail}"}
            for f in self.files.values()
        ]


def _safe_name(name: str | None) -> str:
    if not name:
        return ""
    cleaned = _UNSAFE.sub("_", name.strip().rsplit("/", 1)[-1])
    return "" if cleaned in (".", "..") else cleaned[:200]
