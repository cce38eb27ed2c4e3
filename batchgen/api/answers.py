"""What the Evolink API answers, as batchgen reads it: small frozen records and the tolerant parsing rules.

The server fills its fields loosely (a code as an int or a string, a number as a string, a time as ISO 8601
or unix seconds, results in `results[]` or only in `result_data[]`); everything here reads such answers
into records the rest of batchgen can rely on. Pure functions and dataclasses: no network, no state.
`api/client.py` makes the calls and hands back these records.
"""

from __future__ import annotations

import email.utils
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from batchgen.errors import TransportError

EXCERPT_CHARS = 300  # body excerpts on errors are capped so logs and the store stay small
FILE_LIFETIME = timedelta(hours=72)  # Files API uploads expire this long after upload
FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})

# --- what the client returns ----------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSnapshot:
    """One look at a generation task, from a submit, a poll or a batch poll.

    `results` holds the image URLs (from `results[]`, or `result_data[].image_url` when the server only
    fills that). A failed task always has an `error_code` (`unknown_error` when the server gave none, so
    `errors.decide()` always has a row to look up); a cancelled one without an error reads as
    `request_cancelled`. `replayed` is True when an idempotent resubmit returned the original task.
    """

    id: str
    status: str
    progress: int
    estimated_time_s: float | None
    results: tuple[str, ...]
    credits_reserved: float | None
    credits_used: float | None
    error_code: str | None
    error_message: str | None
    model: str | None
    replayed: bool = False
    request_id: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def final(self) -> bool:
        """True once the task will not change any more (completed, failed or cancelled)."""
        return self.status in FINAL_STATUSES

    @classmethod
    def from_json(
        cls, doc: Mapping[str, Any], *, replayed: bool = False, request_id: str | None = None
    ) -> TaskSnapshot:
        """Read a task object tolerantly; only a missing id makes it unusable (TransportError)."""
        task_id = doc.get("id") or doc.get("task_id")
        if not isinstance(task_id, str) or not task_id:
            raise TransportError("task object without an id", body_excerpt=excerpt(json.dumps(doc)[:1000]))
        status = str(doc.get("status") or "pending").lower()
        task_info = obj(doc.get("task_info"))
        usage = obj(doc.get("usage"))
        results = tuple(u for u in (doc.get("results") or []) if isinstance(u, str) and u)
        if not results:
            results = tuple(
                item["image_url"]
                for item in (doc.get("result_data") or [])
                if isinstance(item, dict) and isinstance(item.get("image_url"), str) and item["image_url"]
            )
        error_code, error_message = task_error(doc.get("error"))
        if status == "cancelled" and error_code is None:
            error_code = "request_cancelled"
        elif status == "failed" and error_code is None:
            error_code = "unknown_error"
        progress = number(doc.get("progress"))
        return cls(
            id=task_id,
            status=status,
            progress=int(progress) if progress is not None else (100 if status == "completed" else 0),
            estimated_time_s=number(task_info.get("estimated_time")),
            results=results,
            credits_reserved=number(usage.get("credits_reserved")),
            credits_used=number(usage.get("credits_used")),
            error_code=error_code,
            error_message=error_message,
            model=doc.get("model") if isinstance(doc.get("model"), str) else None,
            replayed=replayed,
            request_id=request_id,
            raw=dict(doc),
        )


@dataclass(frozen=True)
class Credits:
    """The account's balance from `GET /v1/credits`.

    The server reports the user's balance (`data.user`) and the key's own allowance (`data.token`). A
    key can never spend more than either, so `remaining` is the tighter of the two: the key's remaining
    credits unless the key is unlimited (then the user's), capped by the user's balance when both are
    given. `used` is what this key has used (`token.used_credits`), else the user's total.
    """

    remaining: float | None
    used: float | None
    unlimited: bool

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Credits:
        data = obj(doc.get("data")) or dict(doc)
        user = obj(data.get("user"))
        token = obj(data.get("token"))
        unlimited = token.get("unlimited_credits") is True
        user_left = number(user.get("remaining_credits"))
        token_left = None if unlimited else number(token.get("remaining_credits"))
        candidates = [v for v in (user_left, token_left) if v is not None]
        used = number(token.get("used_credits"))
        if used is None:
            used = number(user.get("used_credits"))
        return cls(remaining=min(candidates) if candidates else None, used=used, unlimited=unlimited)


@dataclass(frozen=True)
class UploadedFile:
    """A file the Files API holds for us; `file_url` goes into `image_urls` until `expires_at` (UTC)."""

    file_id: str
    file_url: str
    file_name: str | None
    file_size: int | None
    mime_type: str | None
    expires_at: datetime
    upload_time: datetime | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> UploadedFile:
        file_id, file_url = data.get("file_id"), data.get("file_url") or data.get("download_url")
        if not isinstance(file_id, str) or not isinstance(file_url, str):
            raise TransportError("upload answer without file_id/file_url", status=200)
        uploaded = parse_time(data.get("upload_time"))
        expires = parse_time(data.get("expires_at"))
        if expires is None:
            # The contract says upload time + 72 h; assume it from now when the server gives neither.
            expires = (uploaded or datetime.now(UTC)) + FILE_LIFETIME
        size = number(data.get("file_size"))
        return cls(
            file_id=file_id,
            file_url=file_url,
            file_name=data.get("file_name") if isinstance(data.get("file_name"), str) else None,
            file_size=int(size) if size is not None else None,
            mime_type=data.get("mime_type") if isinstance(data.get("mime_type"), str) else None,
            expires_at=expires,
            upload_time=uploaded,
        )


@dataclass(frozen=True)
class Quota:
    """How many files the account holds and may hold (100, or 500 for VIP)."""

    used_files: int
    max_files: int
    remain_files: int
    user_group: str | None


@dataclass(frozen=True)
class Downloaded:
    """A result image's bytes as the media host sent them; outputs.py checks that it is an image."""

    data: bytes = field(repr=False)
    content_type: str | None
    url: str


# --- parsing helpers ------------------------------------------------------------------------------


def obj(value: Any) -> dict[str, Any]:
    """A JSON object field, or an empty one when the server sent something else (or nothing)."""
    return value if isinstance(value, dict) else {}


def excerpt(text: str) -> str:
    return " ".join(text.split())[:EXCERPT_CHARS]


def code_str(code: Any) -> str | None:
    """`code` comes as the HTTP status (int) or a string code; we always carry a string."""
    if isinstance(code, bool) or code is None:
        return None
    if isinstance(code, int | str):
        return str(code) or None
    if isinstance(code, float) and code.is_integer():
        return str(int(code))
    return None


def error_fields(text: str) -> tuple[str | None, str | None]:
    """(code, message) from an error body: `{"error":{...}}`, the Files envelope, or nothing usable."""
    try:
        doc = json.loads(text)
    except ValueError:
        return None, None
    if not isinstance(doc, dict):
        return None, None
    err = doc.get("error")
    if isinstance(err, dict):
        message = err.get("message")
        return code_str(err.get("code")), str(message) if message else None
    if isinstance(err, str) and err:
        return code_str(doc.get("code")), err
    message = doc.get("msg") or doc.get("message")
    return code_str(doc.get("code")), str(message) if message else None


def task_error(err: Any) -> tuple[str | None, str | None]:
    if isinstance(err, dict):
        message = err.get("message")
        return code_str(err.get("code")), str(message) if message else None
    if isinstance(err, str) and err:
        return None, err
    return None, None


def retry_after_s(value: str | None) -> float | None:
    """Retry-After as seconds (possibly fractional: a time-scaled emulator sends "0.3") or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return max(0.0, (when - datetime.now(UTC)).total_seconds())
    return max(0.0, seconds) if math.isfinite(seconds) else None


def number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            parsed = float(value)
        except ValueError:
            return None
        return parsed if math.isfinite(parsed) else None
    return None


def parse_time(value: Any) -> datetime | None:
    """ISO 8601 (with Z or an offset; naive means UTC) or unix seconds, as an aware UTC datetime."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    if not isinstance(value, str) or not value:
        return None
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
