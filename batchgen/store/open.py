"""`open_store(db, job)`: the one place that chooses a backend from a `--db` value.

A `postgresql://` (or `postgres://`) URL opens the shared PostgreSQL backend, scoped to the job named by
`job` (the manifest's `name` or `--job NAME`; optional when the database holds exactly one job). Anything
else is a path to a SQLite file, which holds exactly one job (`job` is then only checked, never needed).
psycopg is imported only when a URL is given, so SQLite users never need it loaded.
"""

from __future__ import annotations

from pathlib import Path

from batchgen.errors import ConfigError
from batchgen.store.base import BaseStore
from batchgen.store.scrub import is_database_url, scrub_url

DB_URL_ENV = "BATCHGEN_DB_URL"


def open_store(db: str | Path, job: str | None = None, *, create: bool = False,
               lease_s: float | None = None) -> BaseStore:
    """Open (and migrate) the store behind `db`. `create`: a job not yet in a shared database gets its
    rows (only `batchgen run` creates jobs; the read commands say the job does not exist)."""
    if is_database_url(db):
        from batchgen.store.postgres import DEFAULT_LEASE_S, PostgresStore

        return PostgresStore(str(db), job, create=create, lease_s=lease_s or DEFAULT_LEASE_S)
    if isinstance(db, str) and "://" in db:
        raise ConfigError(f"--db {scrub_url(db)}: not a path and not a postgresql:// URL")
    from batchgen.store.sqlite import Store

    store = Store(Path(db))
    if job:
        rec = store.job_record()
        if rec is not None and rec["name"] != job:
            store.close()
            raise ConfigError(f"{db} holds the job {rec['name']!r}, not {job!r} (a SQLite file holds one job)")
    return store
