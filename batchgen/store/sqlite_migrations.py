"""The steps of the SQLite schema (append only), and applying those a database lacks.

Each step is a function of a `sqlite_utils.Database`; sqlite-utils runs each one in its own transaction and
records it in ``_sqlite_migrations``, and ``PRAGMA user_version`` mirrors the count. To extend the schema,
append a ``m00N_...(db)`` function and add it to `STEPS`; never edit an applied one.

sqlite-utils is imported only when a step is due. An up-to-date database, which is every run but the
first, is checked with one query, so a run or a `status` does not pay for importing it (about 45 ms of
CPU, a fifth of a millisecond per image of a 2,000-image job; issue 12).
"""

from __future__ import annotations

import functools
import secrets
import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sqlite_utils
    from sqlite_utils import Database

SET_NAME = "batchgen"
TABLE = "_sqlite_migrations"

def m001_initial(db: Database) -> None:
    db.execute(
        """CREATE TABLE job (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            name TEXT NOT NULL, manifest_path TEXT, output_dir TEXT, filename_template TEXT,
            settings TEXT, fingerprint TEXT, sync_gen INTEGER NOT NULL DEFAULT 0,
            created_at REAL, updated_at REAL)"""
    )
    db.execute(
        """CREATE TABLE requests (
            key TEXT PRIMARY KEY, item_id TEXT NOT NULL, variant TEXT NOT NULL DEFAULT '{}',
            metadata TEXT NOT NULL DEFAULT '{}', params TEXT NOT NULL, model TEXT NOT NULL,
            n INTEGER NOT NULL DEFAULT 1, est_credits REAL NOT NULL DEFAULT 0, source TEXT NOT NULL DEFAULT '',
            state TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0,
            attempt_no INTEGER NOT NULL DEFAULT 0, not_before REAL NOT NULL DEFAULT 0,
            error_code TEXT, error_message TEXT, sync_gen INTEGER NOT NULL DEFAULT 0,
            created_at REAL, updated_at REAL)"""
    )
    db.execute("CREATE INDEX requests_state_not_before ON requests (state, not_before)")
    db.execute(
        """CREATE TABLE attempts (
            id INTEGER PRIMARY KEY, request_key TEXT NOT NULL REFERENCES requests(key),
            attempt_no INTEGER NOT NULL, idempotency_key TEXT NOT NULL UNIQUE, model TEXT NOT NULL,
            body TEXT, state TEXT NOT NULL, submit_tries INTEGER NOT NULL DEFAULT 0, task_id TEXT,
            submitted_at REAL, finished_at REAL, credits_estimated REAL, credits_reserved REAL,
            credits_used REAL, error_code TEXT, error_message TEXT, result_urls TEXT,
            replayed INTEGER NOT NULL DEFAULT 0)"""
    )
    db.execute("CREATE INDEX attempts_request ON attempts (request_key, attempt_no)")
    db.execute("CREATE INDEX attempts_open ON attempts (state) WHERE state IN ('sending', 'running')")
    db.execute(
        """CREATE TABLE images (
            request_key TEXT NOT NULL REFERENCES requests(key), idx INTEGER NOT NULL,
            path TEXT NOT NULL UNIQUE, url TEXT, bytes INTEGER, sha256 TEXT, width INTEGER, height INTEGER,
            format TEXT, attempt_id INTEGER, created_at REAL, PRIMARY KEY (request_key, idx))"""
    )
    db.execute("PRAGMA user_version = 1")


def m002_runs(db: Database) -> None:
    # One row per `batchgen run`: when it ran, why it ended — for status, cron logs and the report.
    db.execute(
        """CREATE TABLE runs (
            id INTEGER PRIMARY KEY, started_at REAL NOT NULL, finished_at REAL, pid INTEGER, host TEXT,
            exit_code INTEGER, reason TEXT, summary TEXT)"""
    )
    db.execute("PRAGMA user_version = 2")


def m003_uploads(db: Database) -> None:
    # Every file batchgen uploaded through the Files API, so a photo is uploaded once per content (across
    # resumed runs) and only batchgen's own files are ever deleted to free the quota (uploads.py).
    db.execute(
        """CREATE TABLE uploads (
            file_id TEXT PRIMARY KEY, sha256 TEXT NOT NULL, file_url TEXT NOT NULL, expires_at REAL NOT NULL,
            size INTEGER, mime TEXT, path TEXT, uploaded_at REAL NOT NULL, checked_at REAL, suspect_at REAL,
            deleted_at REAL)"""
    )
    db.execute("CREATE INDEX uploads_sha256 ON uploads (sha256, uploaded_at)")
    db.execute("CREATE INDEX uploads_file_url ON uploads (file_url)")
    db.execute("PRAGMA user_version = 3")


def m004_store_id(db: Database) -> None:
    # A random id per database, part of every Idempotency-Key: a server keeps idempotency records for a
    # while, and without it a fresh database (or another --db) asking for the same request would be handed
    # the old task back, often with result URLs that have already expired. Attempts made before this
    # migration keep the key they were sent with (it is stored on the attempt row).
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT INTO meta (key, value) VALUES ('store_id', ?)", [secrets.token_hex(4)])
    db.execute("PRAGMA user_version = 4")


def m005_reviews(db: Database) -> None:
    # Issue 16. Every image's automatic check result; the images a check or a person turned down, kept
    # aside (never deleted) once a new attempt replaces them; and people's decisions on images. An image is
    # identified by (request_key, idx, sha256): a regeneration gives the same (request_key, idx) new bytes,
    # so a decision made on the old bytes can never be mistaken for one on the new.
    db.execute("ALTER TABLE images ADD COLUMN check_status TEXT")  # passed, failed, NULL: not checked
    db.execute("ALTER TABLE images ADD COLUMN check_reasons TEXT")
    db.execute(
        """CREATE TABLE set_aside (
            id INTEGER PRIMARY KEY, request_key TEXT NOT NULL, idx INTEGER NOT NULL, attempt_id INTEGER,
            path TEXT NOT NULL, sha256 TEXT NOT NULL, bytes INTEGER, width INTEGER, height INTEGER, format TEXT,
            why TEXT NOT NULL, reason TEXT, created_at REAL NOT NULL)"""
    )
    db.execute("CREATE INDEX set_aside_request ON set_aside (request_key, idx)")
    db.execute(
        """CREATE TABLE reviews (
            id INTEGER PRIMARY KEY, request_key TEXT NOT NULL, idx INTEGER NOT NULL, sha256 TEXT NOT NULL,
            attempt_id INTEGER, decision TEXT NOT NULL CHECK (decision IN ('approve', 'reject')), reason TEXT,
            decided_at REAL NOT NULL, acted_at REAL)"""
    )
    db.execute("CREATE INDEX reviews_image ON reviews (request_key, idx, sha256)")
    db.execute("CREATE INDEX reviews_open_rejects ON reviews (decision) WHERE acted_at IS NULL")
    db.execute("PRAGMA user_version = 5")


def m006_key_fingerprints(db: Database) -> None:
    # Several API keys in one run (issue 15): which key sent each attempt and uploaded each file, as a
    # fingerprint (never the key), and each key's last known state for `status`.
    db.execute("ALTER TABLE attempts ADD COLUMN key_fp TEXT")
    db.execute("ALTER TABLE uploads ADD COLUMN key_fp TEXT")
    db.execute(
        """CREATE TABLE keys (
            fingerprint TEXT PRIMARY KEY, label TEXT, state TEXT NOT NULL, reason TEXT, balance REAL,
            updated_at REAL)""")
    db.execute("PRAGMA user_version = 6")


def m007_live_requests(db: Database) -> None:
    # Every reader keeps to the requests of the current manifest (sync_gen = the job's, store/live.py): this
    # index makes that a range scan, and counting by state an index-only one, on a million requests.
    db.execute("CREATE INDEX requests_live ON requests (sync_gen, state)")
    db.execute("PRAGMA user_version = 7")


STEPS: tuple[Callable[[Database], None], ...] = (
    m001_initial, m002_runs, m003_uploads, m004_store_id, m005_reviews, m006_key_fingerprints,
    m007_live_requests)
NAMES: tuple[str, ...] = tuple(step.__name__ for step in STEPS)


def applied(conn: sqlite3.Connection) -> list[str]:
    """The names of the steps this database has had, in the order they ran."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", [TABLE]).fetchone() is None:
        return []
    return [r[0] for r in conn.execute(f"SELECT name FROM {TABLE} WHERE migration_set = ? ORDER BY rowid",
                                       [SET_NAME])]


@functools.cache
def migration_set() -> sqlite_utils.Migrations:
    """The steps as a sqlite-utils migration set (tests use it to build a database of an older schema)."""
    import sqlite_utils

    steps = sqlite_utils.Migrations(SET_NAME)
    for step in STEPS:
        steps()(step)
    return steps


def apply(conn: sqlite3.Connection) -> None:
    """Run the steps this database lacks, each in its own transaction."""
    if set(NAMES) <= set(applied(conn)):
        return
    import sqlite_utils

    migration_set().apply(sqlite_utils.Database(conn))
