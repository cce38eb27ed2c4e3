"""The PostgreSQL store: many jobs in one database, many runners on one job (with its ledgers, all its SQL).

Why a server: a job outgrows one host (the nightly catalogue must survive its host; a backfill runs on
several hosts; several people read one job's status from their own machines). PostgreSQL already does
the distributed part — row locks, `FOR UPDATE SKIP LOCKED`, advisory locks, a clock everyone agrees on —
so batchgen adds no coordination of its own beyond a few columns. SQL is kept as text (no ORM), one query
per operation, psycopg 3 with a `psycopg_pool.ConnectionPool`. The concerns the store keeps as attributes
(its ledgers, postgres_<concern>.py) hold their own SQL, through this store's connections and job scope.

Synchronous on purpose (see base.py): the scheduler's store writes happen between awaits, so a
cancellation can never interrupt one; a loopback query costs a fraction of a millisecond.

Jobs: every table carries `job_id` (a row of `jobs`, found by the job's name: the manifest's `name`, or
`--job NAME`), so any number of jobs share one database without seeing each other's rows.

Runners and leases (docs/scale-out.md; registration, heartbeat and takeover are `store.runners`,
postgres_runners.py):

* `runners.lock()` registers this process in `runners` (id, host, pid, started_at, heartbeat_at, lease_s) and
  starts a heartbeat thread that moves `heartbeat_at` forward every `lease_s / 3` on its own pooled
  connection. Times of leases are the database's clock (`clock_timestamp()`), so hosts need not agree on
  the time.
* A runner is *live* while `heartbeat_at + lease_s` is ahead of the database's clock and it has not
  stopped. Every request a runner works on carries its id in `requests.claimed_by` (pending ones it is
  about to submit, and in-flight ones), and every attempt it makes or takes over carries it in
  `attempts.runner_id`.
* `next_due` claims due pending requests with `FOR UPDATE SKIP LOCKED` (two runners never get the same
  row; neither waits for the other); rows claimed by a live runner are skipped.
* `runners.take_over()` claims in-flight requests whose runner is no longer live (killed, host lost, or stopped
  cleanly, which releases at once): tasks with an id are polled, submits without an answer are sent
  again with their stored idempotency key, so a gateway that honours the key charges nothing twice.
* Manifest sync runs under `pg_advisory_xact_lock` for the job, once: the first runner expands it, the
  others find the fingerprint unchanged. A runner whose manifest is older (by the manifest file's mtime)
  than the one last synced says so and does not sync it back (`SyncResult.stale`).
* `runners.elapsed_s()`: the job-wide start of the current group of runners (set by the first runner to
  register while no other is live) for a job-wide `--max-runtime`; `credit_totals()` sums the whole job,
  which the scheduler re-reads every few seconds for a job-wide `--max-credits`.

Secrets: the password comes only from libpq's own sources (the URL, `PGPASSWORD`, `~/.pgpass`); batchgen
never stores the URL and every message that names the database uses `scrub_url()` (open.py).

Migrations: numbered, append-only entries of `MIGRATIONS` (name, SQL), each applied in its own transaction
under an advisory lock and recorded in `batchgen_migrations`; m001–m004 mirror SQLite's (the multi-runner
columns are part of m001, as this backend never existed without them). To add one, append a tuple.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from batchgen.errors import ConfigError, StoreUnavailableError
from batchgen.models import State
from batchgen.store.base import BaseStore
from batchgen.store.live import POSTGRES_LIVE as LIVE
from batchgen.store.postgres_keystates import PostgresKeyStates
from batchgen.store.postgres_reviews import PostgresReviews
from batchgen.store.postgres_runlog import PostgresRunLog
from batchgen.store.postgres_runners import LIVE_RUNNERS, PostgresRunners
from batchgen.store.postgres_uploads import PostgresUploads
from batchgen.store.records import (
    AttemptRecord,
    CreditTotals,
    ImageRecord,
    NewAttempt,
    Outcome,
    RequestRecord,
    SyncResult,
    encode_json,
    idempotency_key,
)
from batchgen.store.scrub import scrub_url

if TYPE_CHECKING:
    from batchgen.manifest.load import Manifest

DEFAULT_LEASE_S = 15.0
_READ_CHUNK = 2000
_SYNC_CHUNK = 5000
_MIGRATION_LOCK = 0x6261746368  # "batch": one migrator at a time per database

# --- migrations (append only) ---------------------------------------------------------------------

MIGRATIONS: list[tuple[str, str]] = [
    ("m001_initial", """
        CREATE TABLE jobs (
            id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL UNIQUE, manifest_path TEXT, output_dir TEXT,
            filename_template TEXT, settings TEXT, fingerprint TEXT, manifest_mtime DOUBLE PRECISION,
            sync_gen INTEGER NOT NULL DEFAULT 0, group_started_at DOUBLE PRECISION,
            created_at DOUBLE PRECISION, updated_at DOUBLE PRECISION);
        CREATE TABLE runners (
            id TEXT PRIMARY KEY, job_id BIGINT NOT NULL REFERENCES jobs(id), host TEXT NOT NULL,
            pid INTEGER NOT NULL, started_at DOUBLE PRECISION NOT NULL, heartbeat_at DOUBLE PRECISION NOT NULL,
            lease_s DOUBLE PRECISION NOT NULL, stopped_at DOUBLE PRECISION);
        CREATE INDEX runners_job ON runners (job_id, heartbeat_at);
        CREATE TABLE requests (
            job_id BIGINT NOT NULL REFERENCES jobs(id), key TEXT NOT NULL, seq BIGSERIAL,
            item_id TEXT NOT NULL, variant TEXT NOT NULL DEFAULT '{}', metadata TEXT NOT NULL DEFAULT '{}',
            params TEXT NOT NULL, model TEXT NOT NULL, n INTEGER NOT NULL DEFAULT 1,
            est_credits DOUBLE PRECISION NOT NULL DEFAULT 0, source TEXT NOT NULL DEFAULT '',
            state TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0,
            attempt_no INTEGER NOT NULL DEFAULT 0, not_before DOUBLE PRECISION NOT NULL DEFAULT 0,
            error_code TEXT, error_message TEXT, sync_gen INTEGER NOT NULL DEFAULT 0,
            claimed_by TEXT, created_at DOUBLE PRECISION, updated_at DOUBLE PRECISION,
            PRIMARY KEY (job_id, key));
        CREATE INDEX requests_due ON requests (job_id, state, not_before, seq);
        CREATE INDEX requests_seq ON requests (job_id, seq);
        CREATE TABLE attempts (
            id BIGSERIAL PRIMARY KEY, job_id BIGINT NOT NULL REFERENCES jobs(id), request_key TEXT NOT NULL,
            attempt_no INTEGER NOT NULL, idempotency_key TEXT NOT NULL, model TEXT NOT NULL, body TEXT,
            state TEXT NOT NULL, submit_tries INTEGER NOT NULL DEFAULT 0, task_id TEXT,
            submitted_at DOUBLE PRECISION, finished_at DOUBLE PRECISION, credits_estimated DOUBLE PRECISION,
            credits_reserved DOUBLE PRECISION, credits_used DOUBLE PRECISION, error_code TEXT,
            error_message TEXT, result_urls TEXT, replayed INTEGER NOT NULL DEFAULT 0, runner_id TEXT,
            UNIQUE (job_id, idempotency_key));
        CREATE INDEX attempts_request ON attempts (job_id, request_key, attempt_no);
        CREATE INDEX attempts_open ON attempts (job_id) WHERE state IN ('sending', 'running');
        CREATE TABLE images (
            job_id BIGINT NOT NULL REFERENCES jobs(id), request_key TEXT NOT NULL, idx INTEGER NOT NULL,
            path TEXT NOT NULL, url TEXT, bytes BIGINT, sha256 TEXT, width INTEGER, height INTEGER,
            format TEXT, attempt_id BIGINT, created_at DOUBLE PRECISION,
            PRIMARY KEY (job_id, request_key, idx), UNIQUE (job_id, path));
    """),
    ("m002_runs", """
        CREATE TABLE runs (
            id BIGSERIAL PRIMARY KEY, job_id BIGINT NOT NULL REFERENCES jobs(id),
            started_at DOUBLE PRECISION NOT NULL, finished_at DOUBLE PRECISION, pid INTEGER, host TEXT,
            runner_id TEXT, exit_code INTEGER, reason TEXT, summary TEXT);
        CREATE INDEX runs_job ON runs (job_id, id);
    """),
    ("m003_uploads", """
        CREATE TABLE uploads (
            job_id BIGINT NOT NULL REFERENCES jobs(id), file_id TEXT NOT NULL, sha256 TEXT NOT NULL,
            file_url TEXT NOT NULL, expires_at DOUBLE PRECISION NOT NULL, size BIGINT, mime TEXT, path TEXT,
            uploaded_at DOUBLE PRECISION NOT NULL, checked_at DOUBLE PRECISION, suspect_at DOUBLE PRECISION,
            deleted_at DOUBLE PRECISION, PRIMARY KEY (job_id, file_id));
        CREATE INDEX uploads_sha256 ON uploads (job_id, sha256, uploaded_at);
        CREATE INDEX uploads_file_url ON uploads (job_id, file_url);
    """),
    ("m004_store_id", """
        -- Per job: key/value facts, among them the random store id that scopes every Idempotency-Key
        -- (written when the job's row is created, see PostgresStore._job_id).
        CREATE TABLE meta (
            job_id BIGINT NOT NULL REFERENCES jobs(id), key TEXT NOT NULL, value TEXT NOT NULL,
            PRIMARY KEY (job_id, key));
    """),
    ("m005_reviews", """
        -- Issue 16 (as SQLite's m005): each image's automatic check result; images kept aside under
        -- _rejected/ (never deleted); people's decisions on images, identified by (request, idx, sha256).
        ALTER TABLE images ADD COLUMN check_status TEXT;
        ALTER TABLE images ADD COLUMN check_reasons TEXT;
        CREATE TABLE set_aside (
            id BIGSERIAL PRIMARY KEY, job_id BIGINT NOT NULL REFERENCES jobs(id), request_key TEXT NOT NULL,
            idx INTEGER NOT NULL, attempt_id BIGINT, path TEXT NOT NULL, sha256 TEXT NOT NULL, bytes BIGINT,
            width INTEGER, height INTEGER, format TEXT, why TEXT NOT NULL, reason TEXT,
            created_at DOUBLE PRECISION NOT NULL);
        CREATE INDEX set_aside_request ON set_aside (job_id, request_key, idx);
        CREATE TABLE reviews (
            id BIGSERIAL PRIMARY KEY, job_id BIGINT NOT NULL REFERENCES jobs(id), request_key TEXT NOT NULL,
            idx INTEGER NOT NULL, sha256 TEXT NOT NULL, attempt_id BIGINT,
            decision TEXT NOT NULL CHECK (decision IN ('approve', 'reject')), reason TEXT,
            decided_at DOUBLE PRECISION NOT NULL, acted_at DOUBLE PRECISION);
        CREATE INDEX reviews_image ON reviews (job_id, request_key, idx, sha256);
        CREATE INDEX reviews_open_rejects ON reviews (job_id, decision) WHERE acted_at IS NULL;
    """),
    ("m006_key_fingerprints", """
        -- Issue 15 (as SQLite's m006): the key each attempt was sent with and each file uploaded with, as a
        -- fingerprint (never the key), and each key's last known state, per job.
        ALTER TABLE attempts ADD COLUMN key_fp TEXT;
        ALTER TABLE uploads ADD COLUMN key_fp TEXT;
        CREATE TABLE keys (
            job_id BIGINT NOT NULL REFERENCES jobs(id), fingerprint TEXT NOT NULL, label TEXT,
            state TEXT NOT NULL, reason TEXT, balance DOUBLE PRECISION, updated_at DOUBLE PRECISION,
            PRIMARY KEY (job_id, fingerprint));
    """),
    ("m007_live_requests", """
        -- As SQLite's m007: every reader keeps to the requests of the current manifest (store/live.py).
        CREATE INDEX requests_live ON requests (job_id, sync_gen, state);
    """),
]


def apply_migrations(conn: psycopg.Connection[Any]) -> list[str]:
    """Apply every migration not yet recorded, each in its own transaction; returns the applied names."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS batchgen_migrations (name TEXT PRIMARY KEY, "
                     "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
    for name, sql in MIGRATIONS:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            if conn.execute("SELECT 1 FROM batchgen_migrations WHERE name = %s", (name,)).fetchone():
                continue
            conn.execute(sql)  # type: ignore[arg-type]  # migration SQL is a literal of this module
            conn.execute("INSERT INTO batchgen_migrations (name) VALUES (%s)", (name,))
    return [r[0] for r in conn.execute("SELECT name FROM batchgen_migrations ORDER BY name").fetchall()]


def _j(value: Any) -> str:
    return encode_json(value)


# --- the store ------------------------------------------------------------------------------------


class PostgresStore(BaseStore):
    """The run state of one job in a PostgreSQL database shared with other jobs and other runners."""

    shared = True

    def __init__(self, url: str, job: str | None, *, create: bool = False, lease_s: float = DEFAULT_LEASE_S,
                 max_connections: int = 4) -> None:
        self._url = url
        self._safe = scrub_url(url)
        self.lease_s = float(lease_s)
        try:
            # One direct connection first: a wrong password or host fails at once with libpq's reason
            # (the pool would keep retrying until its timeout). It also runs the migrations.
            with psycopg.connect(url, autocommit=True, connect_timeout=10, application_name="batchgen") as conn:
                self._migrations = apply_migrations(conn)
        except psycopg.Error as error:
            raise StoreUnavailableError(f"cannot open the database {self._safe}: "
                                        f"{scrub_url(str(error), url).strip()}") from None
        # min_size=1: the main thread's connection stays open; the heartbeat takes a second one.
        self.pool: ConnectionPool[Any] = ConnectionPool(
            url, min_size=1, max_size=max_connections, open=False,
            kwargs={"autocommit": True, "application_name": "batchgen"})
        try:
            try:
                self.pool.open(wait=True, timeout=10.0)
            except PoolTimeout:
                raise StoreUnavailableError(f"cannot open a connection pool to {self._safe}") from None
            self._job = self._resolve_job(job, create)
            self.job_id = self._job_id(self._job, create)
            self.store_id = self.get_meta("store_id") or ""
        except BaseException:
            self.pool.close()
            raise
        self.runner_id: str | None = None  # set by runners.lock(): this process's id among the job's runners
        self.runners = PostgresRunners(self)
        self.uploads = PostgresUploads(self)
        self.run_log = PostgresRunLog(self)
        self.key_states = PostgresKeyStates(self)
        self.reviews = PostgresReviews(self)

    # -- plumbing ----------------------------------------------------------------------------------

    def close(self) -> None:
        self.runners.unlock()
        self.pool.close()

    @property
    def location(self) -> str:
        return f"{self._safe} (job {self._job})"

    @property
    def target(self) -> str:
        return self._url

    @property
    def job_name(self) -> str | None:
        return self._job

    @contextlib.contextmanager
    def _tx(self, write: bool = True) -> Iterator[psycopg.Cursor[Any]]:
        """One transaction on a pooled connection (`write=False`: one statement in autocommit, which is
        atomic by itself and saves the BEGIN and COMMIT round trips); a lost server becomes
        StoreUnavailableError (exit 3)."""
        try:
            with self.pool.connection() as conn:
                tx = conn.transaction() if write else contextlib.nullcontext()
                with tx, conn.cursor() as cur:
                    yield cur
        except (psycopg.OperationalError, PoolTimeout) as error:
            raise StoreUnavailableError(f"the database {self._safe} is unavailable: "
                                        f"{scrub_url(str(error), self._url)}; the run is resumable") from None

    def _rows(self, sql: str, args: Any = None) -> list[dict[str, Any]]:
        """One read statement (or one self-contained write, such as a claim)."""
        with self._tx(write=False) as cur:
            cur.row_factory = dict_row  # type: ignore[assignment]
            cur.execute(sql, args)  # type: ignore[arg-type]
            return list(cur.fetchall())

    def _one(self, sql: str, args: Any = None) -> Any:
        with self._tx(write=False) as cur:
            cur.execute(sql, args)  # type: ignore[arg-type]
            row = cur.fetchone()
            return None if row is None else row[0]

    def _a(self, **kw: Any) -> dict[str, Any]:
        return {"job": self.job_id, "me": self.runner_id, **kw}

    def _resolve_job(self, job: str | None, create: bool) -> str:
        if job:
            return job
        with self._tx(write=False) as cur:
            names = [r[0] for r in cur.execute("SELECT name FROM jobs ORDER BY name").fetchall()]
        if len(names) == 1:
            return str(names[0])
        if not names:
            raise ConfigError(f"the database {self._safe} holds no job yet: run `batchgen run` on a manifest first")
        raise ConfigError(f"the database {self._safe} holds {len(names)} jobs ({', '.join(names)}): "
                          "name one with --job NAME or give its MANIFEST")

    def _job_id(self, name: str, create: bool) -> int:
        with self._tx() as cur:
            row = cur.execute("SELECT id FROM jobs WHERE name = %s", (name,)).fetchone()
            if row is not None:
                return int(row[0])
            if not create:
                raise ConfigError(f"no job named {name!r} in the database {self._safe}: run `batchgen run` on "
                                  "its manifest first, or check --job")
            now = time.time()
            cur.execute("INSERT INTO jobs (name, created_at, updated_at) VALUES (%s, %s, %s) "
                        "ON CONFLICT (name) DO NOTHING", (name, now, now))
            job_id = int(cur.execute("SELECT id FROM jobs WHERE name = %s", (name,)).fetchone()[0])  # type: ignore[index]
            cur.execute("INSERT INTO meta (job_id, key, value) VALUES (%s, 'store_id', %s) ON CONFLICT DO NOTHING",
                        (job_id, secrets.token_hex(4)))
            return job_id

    def schema_version(self) -> int:
        return len(self._migrations)

    def applied_migrations(self) -> list[str]:
        return list(self._migrations)

    # -- job and sync ------------------------------------------------------------------------------

    def job_record(self) -> dict[str, Any] | None:
        rows = self._rows("SELECT name, manifest_path, output_dir, filename_template, settings, fingerprint, "
                          "sync_gen, created_at, updated_at FROM jobs WHERE id = %s AND sync_gen > 0",
                          (self.job_id,))
        if not rows:
            return None
        rec = rows[0]
        rec["settings"] = json.loads(rec["settings"]) if rec["settings"] else {}
        return rec

    def sync(self, manifest: Manifest, out_dir: Path | str | None = None) -> SyncResult:
        """Bring the job's requests in line with the manifest, once, under the job's advisory lock (the same
        rules as SQLite's sync; see sqlite.py). A manifest older than the one synced last is not synced."""
        job = manifest.job
        fingerprint = manifest.fingerprint()
        mtime = _mtime(job.manifest_path)
        now = time.time()
        settings_json = job.run.model_dump_json()
        if isinstance(out_dir, str) and out_dir.startswith("s3://"):
            output_dir = out_dir  # a bucket is recorded as is (a Path would fold its "//")
        else:
            output_dir = str(Path(out_dir).resolve() if out_dir is not None else job.output_dir())
        meta = (str(job.manifest_path), output_dir, job.output.filename, settings_json)
        with self._tx() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtextextended('batchgen-sync:' || %s::text, 0))",
                        (self.job_id,))
            row = cur.execute("SELECT fingerprint, sync_gen, manifest_mtime FROM jobs WHERE id = %s",
                              (self.job_id,)).fetchone()
            assert row is not None
            stored_fp, stored_gen, stored_mtime = row
            if stored_fp == fingerprint:
                cur.execute("UPDATE jobs SET manifest_path=%s, output_dir=%s, filename_template=%s, settings=%s, "
                            "updated_at=%s WHERE id=%s", (*meta, now, self.job_id))
                return SyncResult(0, 0, self._live_total(cur), skipped=True)
            if stored_fp is not None and stored_mtime is not None and mtime < stored_mtime:
                return SyncResult(0, 0, self._live_total(cur), skipped=True, stale=True)
            gen = int(stored_gen or 0) + 1
            live_before = self._count_gen(cur, gen - 1)
            sql = (
                "INSERT INTO requests (job_id, key, item_id, variant, metadata, params, model, n, est_credits, "
                "source, state, sync_gen, created_at, updated_at) "
                "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,'pending',%s,%s,%s) "
                "ON CONFLICT (job_id, key) DO UPDATE SET sync_gen=EXCLUDED.sync_gen, "
                "state=CASE WHEN requests.state='removed' THEN 'pending' ELSE requests.state END, "
                "attempts=CASE WHEN requests.state='removed' THEN 0 ELSE requests.attempts END, "
                "not_before=CASE WHEN requests.state='removed' THEN 0 ELSE requests.not_before END, "
                "updated_at=CASE WHEN requests.state='removed' THEN EXCLUDED.updated_at ELSE requests.updated_at END"
            )
            rows: list[tuple[Any, ...]] = []
            for p in manifest.requests():
                r = p.request
                rows.append((self.job_id, p.key, p.item_id, _j(p.variant), _j(p.metadata),
                             r.model_dump_json(exclude_none=True), r.model, r.n, r.estimated_credits(), p.source,
                             gen, now, now))
                if len(rows) >= _SYNC_CHUNK:
                    cur.executemany(sql, rows)
                    rows.clear()
            if rows:
                cur.executemany(sql, rows)
            manifest.raise_if_problems()  # raises inside the transaction: rolled back, nothing changed
            # Live before and not stamped now: no longer in the manifest, whatever their state (live.py).
            dropped, live_now = self._count_gen(cur, gen - 1), self._count_gen(cur, gen)
            cur.execute("UPDATE requests SET state='removed', updated_at=%s WHERE job_id=%s AND sync_gen < %s "
                        "AND state IN ('pending', 'failed')", (now, self.job_id, gen))
            cur.execute("UPDATE jobs SET manifest_path=%s, output_dir=%s, filename_template=%s, settings=%s, "
                        "fingerprint=%s, manifest_mtime=%s, sync_gen=%s, updated_at=%s WHERE id=%s",
                        (*meta, fingerprint, mtime, gen, now, self.job_id))
        return SyncResult(added=live_now - (live_before - dropped), removed=dropped, total=live_now)

    def _count_gen(self, cur: psycopg.Cursor[Any], gen: int) -> int:
        row = cur.execute("SELECT COUNT(*) FROM requests WHERE job_id = %s AND sync_gen = %s",
                          (self.job_id, gen)).fetchone()
        return int(row[0]) if row else 0

    def _live_total(self, cur: psycopg.Cursor[Any]) -> int:
        row = cur.execute(f"SELECT COUNT(*) FROM requests WHERE job_id = %(job)s AND {LIVE}", self._a()).fetchone()
        return int(row[0]) if row else 0

    # -- reads -------------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Live requests by state; `removed` counts every request the manifest no longer produces (live.py)."""
        out = {s.value: 0 for s in State}
        with self._tx(write=False) as cur:
            for live, state, count in cur.execute(
                    f"SELECT {LIVE}, state, COUNT(*) FROM requests WHERE job_id = %(job)s GROUP BY 1, 2", self._a()):
                if live:
                    out[state] = int(count)
                else:
                    out[State.REMOVED.value] += int(count)
        return out

    def credit_totals(self) -> CreditTotals:
        with self._tx(write=False) as cur:
            row = cur.execute(
                "SELECT COALESCE(SUM(COALESCE(credits_reserved, credits_estimated, 0)) FILTER "
                "(WHERE state IN ('sending', 'running')), 0), COALESCE(SUM(credits_used), 0) "
                "FROM attempts WHERE job_id = %s", (self.job_id,)).fetchone()
        assert row is not None
        return CreditTotals(reserved=float(row[0]), used=float(row[1]))

    def image_totals(self) -> tuple[int, int]:
        with self._tx(write=False) as cur:
            row = cur.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM images WHERE job_id = %(job)s AND "
                              f"request_key IN (SELECT key FROM requests WHERE job_id = %(job)s AND {LIVE})",
                              self._a()).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    def failures_by_code(self, messages_per_code: int = 3) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = []
        with self._tx(write=False) as cur:
            codes = cur.execute(
                "SELECT COALESCE(error_code, 'unknown'), COUNT(*) FROM requests WHERE job_id = %(job)s "
                f"AND state='failed' AND {LIVE} GROUP BY 1 ORDER BY 2 DESC, 1", self._a()).fetchall()
            for code, count in codes:
                msgs = [{"message": m, "count": int(n)} for m, n in cur.execute(
                    "SELECT COALESCE(error_message, ''), COUNT(*) FROM requests WHERE job_id = %(job)s "
                    f"AND state='failed' AND {LIVE} AND COALESCE(error_code, 'unknown')=%(code)s GROUP BY 1 "
                    "ORDER BY 2 DESC, 1 LIMIT %(limit)s", self._a(code=code, limit=messages_per_code)).fetchall()]
                groups.append({"code": code, "count": int(count), "messages": msgs})
        return groups

    def iter_requests(self, states: Iterable[str] | None = None, with_history: bool = True) -> Iterator[RequestRecord]:
        wanted = [str(s) for s in states] if states is not None else [s.value for s in State if s != State.REMOVED]
        live = f" AND {LIVE}" if states is None else ""  # as SQLite's: the live ones unless states are named
        last = 0
        while True:
            chunk = [self._request_record(d) for d in self._rows(
                "SELECT * FROM requests WHERE job_id = %(job)s AND seq > %(last)s AND state = ANY(%(states)s)"
                f"{live} ORDER BY seq LIMIT %(limit)s", self._a(last=last, states=wanted, limit=_READ_CHUNK))]
            if not chunk:
                return
            last = chunk[-1].seq
            if with_history:
                by_key = {r.key: r for r in chunk}
                keys = list(by_key)
                for a in self._attempt_rows("request_key = ANY(%(keys)s) ORDER BY request_key, attempt_no",
                                            keys=keys):
                    by_key[a.request_key].attempt_rows.append(a)
                for img in self._image_rows("request_key = ANY(%(keys)s) ORDER BY request_key, idx", keys=keys):
                    by_key[img.request_key].images.append(img)
            yield from chunk

    def field_names(self) -> tuple[list[str], list[str]]:
        out: list[list[str]] = []
        for column in ("metadata", "variant"):
            rows = self._rows(
                f"SELECT j.key FROM requests r, json_each(r.{column}::json) WITH ORDINALITY AS j(key, value, ord) "
                f"WHERE r.job_id = %(job)s AND r.{LIVE} GROUP BY j.key ORDER BY MIN(r.seq), MIN(j.ord)",
                self._a())
            out.append([str(r["key"]) for r in rows])
        return out[0], out[1]

    def get_meta(self, key: str) -> str | None:
        value = self._one("SELECT value FROM meta WHERE job_id = %s AND key = %s", (self.job_id, key))
        return None if value is None else str(value)

    def set_meta(self, key: str, value: str) -> None:
        with self._tx(write=False) as cur:
            cur.execute("INSERT INTO meta (job_id, key, value) VALUES (%s, %s, %s) ON CONFLICT (job_id, key) "
                        "DO UPDATE SET value = EXCLUDED.value", (self.job_id, key, value))

    def last_change(self) -> float:
        value = self._one(
            "SELECT GREATEST((SELECT MAX(updated_at) FROM requests WHERE job_id = %(job)s), "
            "(SELECT GREATEST(MAX(COALESCE(finished_at, 0)), MAX(COALESCE(submitted_at, 0))) FROM attempts "
            "WHERE job_id = %(job)s), (SELECT MAX(created_at) FROM images WHERE job_id = %(job)s), "
            "(SELECT MAX(decided_at) FROM reviews WHERE job_id = %(job)s))", self._a())
        return float(value or 0.0)

    def get_request(self, key: str) -> RequestRecord | None:
        rows = self._rows("SELECT * FROM requests WHERE job_id = %s AND key = %s", (self.job_id, key))
        if not rows:
            return None
        rec = self._request_record(rows[0])
        rec.attempt_rows = self._attempt_rows("request_key = %(key)s ORDER BY attempt_no", key=key)
        rec.images = self._image_rows("request_key = %(key)s ORDER BY idx", key=key)
        return rec

    def images_for(self, key: str) -> list[ImageRecord]:
        return self._image_rows("request_key = %(key)s ORDER BY idx", key=key)

    def images_since(self, since: float) -> list[ImageRecord]:
        return self._image_rows("created_at >= %(since)s ORDER BY created_at", since=since)

    def reopen_downloads(self, keys: Sequence[str]) -> int:
        with self._tx() as cur:
            cur.execute("UPDATE requests SET state='completed', updated_at=%s WHERE job_id=%s AND key = ANY(%s) "
                        "AND state='done'", (time.time(), self.job_id, list(keys)))
            return cur.rowcount

    def sample_images(self, limit: int) -> list[ImageRecord]:
        ends = ("SELECT request_key, idx FROM images WHERE job_id = %(job)s ORDER BY created_at {}, request_key, "
                "idx LIMIT %(half)s")
        return self._image_rows(f"((request_key, idx) IN ({ends.format('ASC')}) OR (request_key, idx) IN "
                                f"({ends.format('DESC')}))", half=max(1, limit // 2))

    def waiting_retry(self, now: float) -> int:
        return int(self._one("SELECT COUNT(*) FROM requests WHERE job_id = %(job)s AND state='pending' "
                             f"AND not_before > %(now)s AND {LIVE}", self._a(now=now)))

    @staticmethod
    def _request_record(d: dict[str, Any]) -> RequestRecord:
        return RequestRecord(
            key=d["key"], seq=d["seq"], item_id=d["item_id"], variant=json.loads(d["variant"]),
            metadata=json.loads(d["metadata"]), params=json.loads(d["params"]), model=d["model"], n=d["n"],
            est_credits=d["est_credits"], source=d["source"], state=State(d["state"]), attempts=d["attempts"],
            attempt_no=d["attempt_no"], not_before=d["not_before"], error_code=d["error_code"],
            error_message=d["error_message"], created_at=d["created_at"], updated_at=d["updated_at"])

    @staticmethod
    def _attempt_record(d: dict[str, Any]) -> AttemptRecord:
        return AttemptRecord(
            id=d["id"], request_key=d["request_key"], attempt_no=d["attempt_no"],
            idempotency_key=d["idempotency_key"], model=d["model"], state=d["state"],
            submit_tries=d["submit_tries"], task_id=d["task_id"], submitted_at=d["submitted_at"],
            finished_at=d["finished_at"], credits_estimated=d["credits_estimated"],
            credits_reserved=d["credits_reserved"], credits_used=d["credits_used"], error_code=d["error_code"],
            error_message=d["error_message"], result_urls=json.loads(d["result_urls"] or "[]"),
            replayed=bool(d["replayed"]), body=json.loads(d["body"]) if d["body"] else None,
            key_fp=d.get("key_fp"))

    def _attempt_rows(self, where: str, **kw: Any) -> list[AttemptRecord]:
        return [self._attempt_record(d) for d in self._rows(
            f"SELECT * FROM attempts WHERE job_id = %(job)s AND {where}", self._a(**kw))]

    def _image_rows(self, where: str, **kw: Any) -> list[ImageRecord]:
        with self._tx(write=False) as cur:
            cur.execute("SELECT request_key, idx, path, url, bytes, sha256, width, height, format, attempt_id, "
                        f"created_at, check_status, check_reasons FROM images WHERE job_id = %(job)s AND {where}",
                        self._a(**kw))  # type: ignore[arg-type]
            return [ImageRecord(*row) for row in cur.fetchall()]

    # -- the run engine's transitions ----------------------------------------------------------------

    def next_due(self, limit: int, now: float | None = None) -> list[RequestRecord]:
        """Claim up to `limit` due pending requests for this runner (SKIP LOCKED: runners never wait on
        each other); requests another live runner holds are skipped."""
        now = time.time() if now is None else now
        with self._tx(write=False) as cur:
            cur.row_factory = dict_row  # type: ignore[assignment]
            cur.execute(
                "WITH picked AS (SELECT key FROM requests WHERE job_id = %(job)s AND state = 'pending' "
                "AND not_before <= %(now)s AND (claimed_by IS NULL OR claimed_by = %(me)s "
                f"OR claimed_by NOT IN ({LIVE_RUNNERS})) ORDER BY not_before, seq LIMIT %(limit)s "
                "FOR UPDATE SKIP LOCKED) "
                "UPDATE requests r SET claimed_by = %(me)s FROM picked WHERE r.job_id = %(job)s "
                "AND r.key = picked.key RETURNING r.*", self._a(now=now, limit=limit))
            rows = [self._request_record(d) for d in cur.fetchall()]
        return sorted(rows, key=lambda r: (r.not_before, r.seq))

    def next_not_before(self) -> float | None:
        """When the earliest pending request this runner may claim becomes due (others' claims excluded,
        or the submitter would spin on rows it cannot have)."""
        value = self._one("SELECT MIN(not_before) FROM requests WHERE job_id = %(job)s AND state='pending' "
                          f"AND (claimed_by IS NULL OR claimed_by = %(me)s OR claimed_by NOT IN ({LIVE_RUNNERS}))",
                          self._a())
        return None if value is None else float(value)

    def pending_estimate(self) -> float:
        return float(self._one("SELECT COALESCE(SUM(est_credits), 0) FROM requests WHERE job_id = %(job)s "
                               f"AND state='pending' AND {LIVE}", self._a()))

    def has_pending(self) -> bool:
        return self._one("SELECT 1 FROM requests WHERE job_id = %s AND state='pending' LIMIT 1",
                         (self.job_id,)) is not None

    def open_attempts(self) -> list[tuple[RequestRecord, AttemptRecord]]:
        """Requests in flight with their current attempt that this process may work on: without a runner
        (status, tests) every one of the job; as a runner, its own plus those of runners no longer live
        (which it claims; see runners.take_over)."""
        if self.runner_id is not None:
            mine = self._open_where("r.claimed_by = %(me)s")
            return sorted(mine + self.runners.take_over(limit=1 << 30), key=lambda p: p[0].seq)
        return self._open_where("TRUE")

    def _open_where(self, cond: str) -> list[tuple[RequestRecord, AttemptRecord]]:
        reqs = [self._request_record(d) for d in self._rows(
            "SELECT * FROM requests r WHERE job_id = %(job)s AND state IN ('submitted', 'completed') "
            f"AND {cond} ORDER BY seq", self._a())]
        if not reqs:
            return []
        keys = [r.key for r in reqs]
        latest = {a.request_key: a for a in (self._attempt_record(d) for d in self._rows(
            "SELECT DISTINCT ON (request_key) * FROM attempts WHERE job_id = %(job)s AND request_key = ANY(%(keys)s) "
            "ORDER BY request_key, attempt_no DESC", self._a(keys=keys)))}
        return [(r, latest[r.key]) for r in reqs if r.key in latest]

    def idempotency_key(self, request_key: str, attempt_no: int, key_fp: str = "") -> str:
        return idempotency_key(request_key, attempt_no, self.store_id, key_fp)

    def start_attempts(self, items: Sequence[NewAttempt]) -> list[int]:
        if not items:
            return []
        now = time.time()
        ids = []
        with self._tx() as cur:
            # executemany runs in pipeline mode: one round trip for the whole batch, not one per row.
            cur.executemany(
                "INSERT INTO attempts (job_id, request_key, attempt_no, idempotency_key, model, body, state, "
                "submitted_at, credits_estimated, runner_id, key_fp) "
                "VALUES (%s,%s,%s,%s,%s,%s,'sending',%s,%s,%s,%s) RETURNING id",
                [(self.job_id, a.request_key, a.attempt_no,
                  self.idempotency_key(a.request_key, a.attempt_no, (a.key_fp or "") if a.scoped else ""),
                  a.model, _j(a.body) if a.body is not None else None, now, a.credits_estimated, self.runner_id,
                  a.key_fp)
                 for a in items], returning=True)
            while True:
                row = cur.fetchone()
                ids.append(int(row[0]) if row else 0)
                if not cur.nextset():
                    break
            cur.executemany(
                "UPDATE requests SET state='submitted', attempts=attempts+1, attempt_no=%s, model=%s, "
                "error_code=NULL, error_message=NULL, claimed_by=%s, updated_at=%s WHERE job_id=%s AND key=%s",
                [(a.attempt_no, a.model, self.runner_id, now, self.job_id, a.request_key) for a in items])
        return ids

    def record_task(self, attempt_id: int, task_id: str, credits_reserved: float | None, replayed: bool) -> None:
        self.record_tasks([(attempt_id, task_id, credits_reserved, replayed)])

    def record_tasks(self, accepted: Sequence[tuple[int, str, float | None, bool]]) -> None:
        """The task ids answered in one loop turn, in one transaction, before anything waits on them."""
        with self._tx() as cur:
            cur.executemany(
                "UPDATE attempts SET state='running', task_id=%s, credits_reserved=%s, replayed=%s, "
                "submit_tries=submit_tries+1 WHERE id=%s AND job_id=%s",
                [(task_id, reserved, int(replayed), attempt_id, self.job_id)
                 for attempt_id, task_id, reserved, replayed in accepted])

    def retry_submit(self, attempt_id: int, request_key: str, not_before: float, code: str | None,
                     message: str | None) -> None:
        with self._tx() as cur:
            cur.execute("UPDATE attempts SET submit_tries=submit_tries+1, error_code=%s, error_message=%s "
                        "WHERE id=%s AND job_id=%s", (code, message, attempt_id, self.job_id))
            cur.execute("UPDATE requests SET not_before=%s, updated_at=%s WHERE job_id=%s AND key=%s",
                        (not_before, time.time(), self.job_id, request_key))

    def record_outcomes(self, outcomes: Sequence[Outcome]) -> None:
        """Apply one poll's results in one transaction: one pipelined executemany per kind of statement
        (the rows of one batch are distinct requests, so their order does not matter)."""
        if not outcomes:
            return
        now = time.time()
        running = [(o.credits_reserved, o.attempt_id, self.job_id) for o in outcomes
                   if o.kind == "running" and o.credits_reserved is not None]
        done = [o for o in outcomes if o.kind == "completed"]
        bad = [o for o in outcomes if o.kind in ("requeue", "failed")]
        with self._tx() as cur:
            if running:
                cur.executemany("UPDATE attempts SET credits_reserved=%s WHERE id=%s AND job_id=%s", running)
            if done:
                cur.executemany(
                    "UPDATE attempts SET state='completed', finished_at=%s, result_urls=%s, "
                    "credits_reserved=COALESCE(%s, credits_reserved), "
                    "credits_used=COALESCE(%s, %s, credits_reserved), error_code=NULL, error_message=NULL "
                    "WHERE id=%s AND job_id=%s",
                    [(now, _j(list(o.result_urls)), o.credits_reserved, o.credits_used, o.credits_reserved,
                      o.attempt_id, self.job_id) for o in done])
                cur.executemany("UPDATE requests SET state='completed', updated_at=%s WHERE job_id=%s AND key=%s",
                                [(now, self.job_id, o.request_key) for o in done])
            if bad:
                cur.executemany(
                    "UPDATE attempts SET state='failed', finished_at=%s, credits_used=0, error_code=%s, "
                    "error_message=%s WHERE id=%s AND job_id=%s",
                    [(now, o.error_code, o.error_message, o.attempt_id, self.job_id) for o in bad])
                for o in bad:
                    if o.kind == "requeue":
                        self._requeue(cur, o.request_key, o.not_before, o.error_code, o.error_message, o.model,
                                      o.consume_attempt, now)
                    else:
                        self._fail(cur, o.request_key, o.error_code, o.error_message, now)

    def abandon_attempt(self, attempt_id: int, code: str, message: str) -> None:
        with self._tx(write=False) as cur:
            self._abandon(cur, attempt_id, code, message, time.time())

    def release_open_attempts(self, code: str, message: str) -> int:
        """As in SQLite (an in-process emulator's tasks died with it), but only requests no live runner holds."""
        return self._give_up_open("r.state IN ('submitted', 'completed')", code, message, charge=False)

    def abandon_tasks_of(self, key_fps: Sequence[str], code: str, message: str) -> int:
        """As in SQLite, but only requests no live runner holds (a live runner may be polling them)."""
        if not key_fps:
            return 0
        return self._give_up_open("r.state = 'submitted' AND a.state IN ('sending', 'running') "
                                  "AND a.key_fp = ANY(%(fps)s)", code, message, charge=True, fps=list(key_fps))

    def _give_up_open(self, where: str, code: str, message: str, *, charge: bool, **params: Any) -> int:
        """As in SQLite, skipping the requests a live runner holds (and rows another transaction has locked)."""
        now = time.time()
        with self._tx() as cur:
            rows = cur.execute(
                "SELECT a.id, r.key FROM requests r JOIN attempts a ON a.job_id = r.job_id AND "
                f"a.request_key = r.key AND a.attempt_no = r.attempt_no WHERE r.job_id = %(job)s AND {where} "
                "AND (r.claimed_by IS NULL OR r.claimed_by = %(me)s "
                f"OR r.claimed_by NOT IN ({LIVE_RUNNERS})) FOR UPDATE OF r SKIP LOCKED",
                self._a(**params)).fetchall()
            for attempt_id, key in rows:
                if charge:
                    cur.execute("UPDATE attempts SET credits_used = COALESCE(credits_used, credits_reserved, "
                                "credits_estimated, 0) WHERE id=%s AND job_id=%s", (attempt_id, self.job_id))
                self._abandon(cur, attempt_id, code, message, now)
                self._requeue(cur, key, 0.0, code, message, None, False, now)
        return len(rows)

    def update_result_urls(self, attempt_id: int, urls: Sequence[str]) -> None:
        with self._tx(write=False) as cur:
            cur.execute("UPDATE attempts SET result_urls=%s WHERE id=%s AND job_id=%s",
                        (_j(list(urls)), attempt_id, self.job_id))

    def record_image(self, img: ImageRecord, done: bool) -> None:
        self.record_images([(img, done)])

    def record_images(self, saved: Sequence[tuple[ImageRecord, bool]]) -> None:
        """Several saved images in one transaction (`done`: the request is done with that image)."""
        with self._tx() as cur:
            cur.executemany(
                "INSERT INTO images (job_id, request_key, idx, path, url, bytes, sha256, width, height, format, "
                "attempt_id, created_at, check_status, check_reasons) "
                "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) "
                "ON CONFLICT (job_id, request_key, idx) DO UPDATE SET "
                "path=EXCLUDED.path, url=EXCLUDED.url, bytes=EXCLUDED.bytes, sha256=EXCLUDED.sha256, "
                "width=EXCLUDED.width, height=EXCLUDED.height, format=EXCLUDED.format, "
                "attempt_id=EXCLUDED.attempt_id, created_at=EXCLUDED.created_at, "
                "check_status=EXCLUDED.check_status, check_reasons=EXCLUDED.check_reasons",
                [(self.job_id, img.request_key, img.idx, img.path, img.url, img.bytes, img.sha256, img.width,
                  img.height, img.format, img.attempt_id, img.created_at, img.check_status, img.check_reasons)
                 for img, _ in saved])
            done = [img.request_key for img, is_done in saved if is_done]
            if done:
                cur.execute("UPDATE requests SET state='done', error_code=NULL, error_message=NULL, claimed_by=NULL, "
                            "updated_at=%s WHERE job_id=%s AND key = ANY(%s)", (time.time(), self.job_id, done))

    def path_owner(self, paths: Sequence[str]) -> str | None:
        value = self._one("SELECT request_key FROM images WHERE job_id = %s AND path = ANY(%s) LIMIT 1",
                          (self.job_id, list(paths)))
        return None if value is None else str(value)

    def is_live(self, key: str) -> bool:
        return self._one(f"SELECT 1 FROM requests WHERE job_id = %(job)s AND key = %(key)s AND {LIVE}",
                         self._a(key=key)) is not None

    def move_image(self, key: str, idx: int, path: str) -> None:
        with self._tx(write=False) as cur:
            cur.execute("UPDATE images SET path=%s WHERE job_id=%s AND request_key=%s AND idx=%s",
                        (path, self.job_id, key, idx))

    def live_images_under(self, prefix: str) -> list[ImageRecord]:
        return self._image_rows("substr(path, 1, %(n)s) = %(prefix)s AND request_key IN (SELECT key FROM requests "
                                f"WHERE job_id = %(job)s AND {LIVE}) ORDER BY request_key, idx",
                                n=len(prefix), prefix=prefix)

    def finish_request(self, key: str) -> None:
        with self._tx(write=False) as cur:
            cur.execute("UPDATE requests SET state='done', error_code=NULL, error_message=NULL, claimed_by=NULL, "
                        "updated_at=%s WHERE job_id=%s AND key=%s", (time.time(), self.job_id, key))

    def requeue(self, key: str, not_before: float, code: str | None, message: str | None, *,
                model: str | None = None, consume_attempt: bool = True) -> None:
        with self._tx(write=False) as cur:
            self._requeue(cur, key, not_before, code, message, model, consume_attempt, time.time())

    def defer(self, key: str, not_before: float, code: str | None, message: str | None) -> None:
        with self._tx(write=False) as cur:
            cur.execute("UPDATE requests SET not_before=%s, error_code=%s, error_message=%s, updated_at=%s "
                        "WHERE job_id=%s AND key=%s", (not_before, code, message, time.time(), self.job_id, key))

    def fail(self, key: str, code: str | None, message: str | None) -> None:
        with self._tx(write=False) as cur:
            self._fail(cur, key, code, message, time.time())

    def _requeue(self, cur: psycopg.Cursor[Any], key: str, not_before: float, code: str | None,
                 message: str | None, model: str | None, consume_attempt: bool, now: float) -> None:
        # As in SQLite: a request the manifest no longer produces is `removed`, not sent again.
        cur.execute(
            f"UPDATE requests SET state=CASE WHEN {LIVE} THEN 'pending' ELSE 'removed' END, not_before=%(nb)s, "
            "error_code=%(code)s, error_message=%(msg)s, model=COALESCE(%(model)s, model), "
            "attempts=attempts - %(back)s, updated_at=%(now)s WHERE job_id=%(job)s AND key=%(key)s",
            {"nb": not_before, "code": code, "msg": message, "model": model, "back": 0 if consume_attempt else 1,
             "now": now, "job": self.job_id, "key": key})

    def _fail(self, cur: psycopg.Cursor[Any], key: str, code: str | None, message: str | None, now: float) -> None:
        cur.execute("UPDATE requests SET state='failed', error_code=%s, error_message=%s, claimed_by=NULL, "
                    "updated_at=%s WHERE job_id=%s AND key=%s", (code, message, now, self.job_id, key))

    def _abandon(self, cur: psycopg.Cursor[Any], attempt_id: int, code: str | None, message: str | None,
                 now: float) -> None:
        cur.execute("UPDATE attempts SET state='abandoned', error_code=%s, error_message=%s, finished_at=%s "
                    "WHERE id=%s AND job_id=%s", (code, message, now, attempt_id, self.job_id))

    def requeue_failed(self, codes: list[str] | None = None) -> int:
        sql = ("UPDATE requests SET state='pending', attempts=0, not_before=0, model=params::json->>'model', "
               f"claimed_by=NULL, updated_at=%(now)s WHERE job_id=%(job)s AND state='failed' AND {LIVE}")
        if codes:
            sql += " AND error_code = ANY(%(codes)s)"
        with self._tx(write=False) as cur:
            cur.execute(sql, self._a(now=time.time(), codes=codes))  # type: ignore[arg-type]
            return int(cur.rowcount)



def _mtime(path: Path | None) -> float:
    """The manifest file's modification time (0 when it cannot be read): which of two versions is newer."""
    try:
        return Path(path).stat().st_mtime if path is not None else 0.0
    except OSError:
        return 0.0
