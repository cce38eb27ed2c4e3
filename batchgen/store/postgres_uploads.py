"""The uploads ledger of the PostgreSQL store (`store.uploads`; interface in uploads.py): the `uploads` table.

Every statement is scoped by the store's job (`job_id`), like every other of this backend, so jobs sharing a
database never see each other's files. It goes through its store's pooled transactions (`PostgresStore._tx`),
so a lost server is the same resumable StoreUnavailableError as anywhere else, and psycopg stays imported by
postgres.py alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from batchgen.store.records import UploadRecord
from batchgen.store.uploads import UploadLedger, local_only, urls_of

if TYPE_CHECKING:
    from batchgen.store.postgres import PostgresStore


class PostgresUploads(UploadLedger):
    """The files batchgen uploaded for one job of a shared PostgreSQL database."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store

    def record(self, rec: UploadRecord) -> None:
        with self.store._tx(write=False) as cur:
            cur.execute(
                "INSERT INTO uploads (job_id, file_id, sha256, file_url, expires_at, size, mime, path, uploaded_at, "
                "checked_at, suspect_at, deleted_at, key_fp) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) "
                "ON CONFLICT (job_id, file_id) DO UPDATE SET sha256=EXCLUDED.sha256, file_url=EXCLUDED.file_url, "
                "expires_at=EXCLUDED.expires_at, size=EXCLUDED.size, mime=EXCLUDED.mime, path=EXCLUDED.path, "
                "uploaded_at=EXCLUDED.uploaded_at, checked_at=EXCLUDED.checked_at, suspect_at=EXCLUDED.suspect_at, "
                "deleted_at=EXCLUDED.deleted_at, key_fp=EXCLUDED.key_fp",
                (self.store.job_id, rec.file_id, rec.sha256, rec.file_url, rec.expires_at, rec.size, rec.mime,
                 rec.path, rec.uploaded_at, rec.checked_at, rec.suspect_at, rec.deleted_at, rec.key_fp))

    def current(self, sha256: str, key_fp: str | None = None, *, legacy: bool = True) -> UploadRecord | None:
        rows = self._rows(f"sha256 = %(sha)s AND deleted_at IS NULL AND {_key_match(key_fp, legacy)} "
                          "ORDER BY uploaded_at DESC LIMIT 1", sha=sha256, fp=key_fp)
        return rows[0] if rows else None

    def by_url(self, urls: Iterable[str]) -> list[UploadRecord]:
        urls = list(dict.fromkeys(urls))
        if not urls:
            return []
        return self._rows("file_url = ANY(%(urls)s)", urls=urls)

    def live(self, key_fp: str | None = None, *, legacy: bool = True) -> list[UploadRecord]:
        return self._rows(f"deleted_at IS NULL AND {_key_match(key_fp, legacy)} ORDER BY uploaded_at", fp=key_fp)

    def mark(self, file_id: str, *, checked_at: float | None = None, suspect_at: float | None = None,
             deleted_at: float | None = None) -> None:
        with self.store._tx(write=False) as cur:
            cur.execute("UPDATE uploads SET checked_at=COALESCE(%s, checked_at), suspect_at=COALESCE(%s, suspect_at), "
                        "deleted_at=COALESCE(%s, deleted_at) WHERE job_id=%s AND file_id=%s",
                        (checked_at, suspect_at, deleted_at, self.store.job_id, file_id))

    def local_references(self, states: Sequence[str] = ("pending", "submitted")) -> list[tuple[str, str]]:
        with self.store._tx(write=False) as cur:
            cur.execute(
                "SELECT r.key, j.value FROM requests r, json_array_elements_text(CASE WHEN "
                "json_typeof(r.params::json->'image_urls') = 'array' THEN r.params::json->'image_urls' "
                "ELSE '[]'::json END) AS j(value) WHERE r.job_id = %(job)s AND r.state = ANY(%(states)s) "
                "UNION ALL SELECT key, params::json->>'mask_url' FROM requests WHERE job_id = %(job)s "
                "AND state = ANY(%(states)s) AND params::json->>'mask_url' IS NOT NULL",
                self.store._a(states=list(states)))
            rows = cur.fetchall()
        return local_only(rows)

    def open_attempt_urls(self) -> set[str]:
        with self.store._tx(write=False) as cur:
            cur.execute(
                "SELECT j.value FROM attempts a, json_array_elements_text(CASE WHEN "
                "json_typeof(a.body::json->'image_urls') = 'array' THEN a.body::json->'image_urls' "
                "ELSE '[]'::json END) AS j(value) WHERE a.job_id = %(job)s AND a.state IN ('sending', 'running') "
                "AND a.body IS NOT NULL UNION SELECT body::json->>'mask_url' FROM attempts WHERE job_id = %(job)s "
                "AND state IN ('sending', 'running') AND body IS NOT NULL", self.store._a())
            return urls_of(cur.fetchall())

    def _rows(self, where: str, **kw: Any) -> list[UploadRecord]:
        with self.store._tx(write=False) as cur:
            cur.execute("SELECT file_id, sha256, file_url, expires_at, size, mime, path, uploaded_at, checked_at, "
                        f"suspect_at, deleted_at, key_fp FROM uploads WHERE job_id = %(job)s AND {where}",  # type: ignore[arg-type]
                        self.store._a(**kw))
            return [UploadRecord(*row) for row in cur.fetchall()]


def _key_match(key_fp: str | None, legacy: bool) -> str:
    """SQL for "uploaded with the key %(fp)s" (and, with `legacy`, before m006); no key: any key."""
    if key_fp is None:
        return "TRUE"
    return "(key_fp = %(fp)s OR key_fp IS NULL)" if legacy else "key_fp = %(fp)s"
