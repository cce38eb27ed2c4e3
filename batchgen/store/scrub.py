"""Database URLs without their secrets, for every message that names a database.

A `postgresql://user:secret@host/db` URL may carry a password (libpq reads it from there, from
PGPASSWORD or from ~/.pgpass). batchgen never stores or logs the URL; whatever it prints about a database
goes through `scrub_url`, which also cleans the password out of a driver's error text.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_URL = re.compile(r"postgres(?:ql)?://[^\s'\"]+")
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)


def is_database_url(value: str | object) -> bool:
    return isinstance(value, str) and value.startswith(("postgresql://", "postgres://"))


def _scrub_one(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return "postgresql://***"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}@{host}" if ":" not in userinfo else f"{user}:***@{host}"
    query = _KV_PASSWORD.sub(r"\1***", parts.query.replace("&", " ")).replace(" ", "&") if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def scrub_url(text: str, url: str | None = None) -> str:
    """`text` with every database URL's password replaced by *** (and, if given, the password of `url`
    wherever else it appears, as a driver's message may quote it)."""
    out = _URL.sub(lambda m: _scrub_one(m.group(0)), text)
    out = _KV_PASSWORD.sub(r"\1***", out)
    if url:
        try:
            password = urlsplit(url).password
        except ValueError:
            password = None
        if password:
            out = out.replace(password, "***")
    return out
