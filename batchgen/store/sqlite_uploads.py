"""The uploads ledger of the SQLite store (`store.uploads`; interface in uploads.py): the `uploads` table.

It reads and writes through its store's connection and write transactions (`Store.conn`, `Store._tx`), so
the store's durability and its fault handling (a full disk is a LocalFaultError) hold here unchanged; the
schema of the table is in sqlite.py's docstring and its steps in sqlite_migrations.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from batchgen.store.records import UploadRecord
from batchgen.store.uploads import UploadLedger, local_only, urls_of

if TYPE_CHECKING:
    from batchgen.store.sqlite import Store


class SqliteUploads(UploadLedger):
    """The files batchgen uploaded, in the job's SQLite file."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def record(self, rec: UploadRecord) -> None:
        """Commit an upload the moment the Files API answered, so a killed run does not upload it again."""
        with self.store._tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO uploads (file_id, sha256, file_url, expires_at, size, mime, path, uploaded_at, "
                "checked_at, suspect_at, deleted_at, key_fp) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (rec.file_id, rec.sha256, rec.file_url, rec.expires_at, rec.size, rec.mime, rec.path, rec.uploaded_at,
                 rec.checked_at, rec.suspect_at, rec.deleted_at, rec.key_fp))

    def current(self, sha256: str, key_fp: str | None = None, *, legacy: bool = True) -> UploadRecord | None:
        """The newest upload of this content that batchgen has not deleted (it may have expired), made with
        the key `key_fp` (files belong to an account; None: any key). `legacy`: uploads from before m006 (no
        key recorded, so made with the only key there was) count too — right for a one-key run, not a pool."""
        where, args = _key_match(key_fp, legacy)
        rows = self._rows(f"sha256 = ? AND deleted_at IS NULL AND {where} ORDER BY uploaded_at DESC LIMIT 1",
                          [sha256, *args])
        return rows[0] if rows else None

    def by_url(self, urls: Iterable[str]) -> list[UploadRecord]:
        """batchgen's uploads (deleted ones too) behind these URLs; other URLs are simply not found."""
        urls = list(dict.fromkeys(urls))
        if not urls:
            return []
        return self._rows(f"file_url IN ({','.join('?' * len(urls))})", urls)

    def live(self, key_fp: str | None = None, *, legacy: bool = True) -> list[UploadRecord]:
        """batchgen's uploads made with the key `key_fp` (see `current`) not deleted yet (expired ones
        included), oldest first."""
        where, args = _key_match(key_fp, legacy)
        return self._rows(f"deleted_at IS NULL AND {where} ORDER BY uploaded_at", args)

    def mark(self, file_id: str, *, checked_at: float | None = None, suspect_at: float | None = None,
             deleted_at: float | None = None) -> None:
        """Set the given times on an upload (None leaves a column as it is)."""
        with self.store._tx() as c:
            c.execute("UPDATE uploads SET checked_at=COALESCE(?, checked_at), suspect_at=COALESCE(?, suspect_at), "
                      "deleted_at=COALESCE(?, deleted_at) WHERE file_id=?",
                      (checked_at, suspect_at, deleted_at, file_id))

    def local_references(self, states: Sequence[str] = ("pending", "submitted")) -> list[tuple[str, str]]:
        """(request key, local path) for every image_urls entry and mask_url that is not an http(s) URL, of
        the requests in these states: what the job still needs uploaded."""
        qs = ",".join("?" * len(states))
        cur = self.store.conn.execute(
            f"SELECT r.key, j.value FROM requests r, json_each(r.params, '$.image_urls') j WHERE r.state IN ({qs}) "
            f"UNION ALL SELECT key, json_extract(params, '$.mask_url') FROM requests WHERE state IN ({qs}) "
            "AND json_extract(params, '$.mask_url') IS NOT NULL", (*states, *states))
        return local_only(cur.fetchall())

    def open_attempt_urls(self) -> set[str]:
        """Every reference URL in the bodies of attempts still open (sending or running): files the API may
        still fetch, which must not be deleted."""
        cur = self.store.conn.execute(
            "SELECT j.value FROM attempts a, json_each(a.body, '$.image_urls') j "
            "WHERE a.state IN ('sending', 'running') AND a.body IS NOT NULL "
            "UNION SELECT json_extract(body, '$.mask_url') FROM attempts "
            "WHERE state IN ('sending', 'running') AND body IS NOT NULL")
        return urls_of(cur.fetchall())

    def _rows(self, where: str, args: Sequence[Any]) -> list[UploadRecord]:
        cur = self.store.conn.execute(
            "SELECT file_id, sha256, file_url, expires_at, size, mime, path, uploaded_at, checked_at, suspect_at, "
            f"deleted_at, key_fp FROM uploads WHERE {where}", tuple(args))
        return [UploadRecord(*row) for row in cur.fetchall()]


def _key_match(key_fp: str | None, legacy: bool) -> tuple[str, list[Any]]:
    """SQL and parameters for "uploaded with this key" (and, with `legacy`, before m006); None: any key."""
    if key_fp is None:
        return "1", []
    return ("(key_fp = ? OR key_fp IS NULL)" if legacy else "key_fp = ?"), [key_fp]
