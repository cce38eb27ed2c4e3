"""The SQLite store: the run state of one job, in one file (with its ledgers, every SQLite statement).

Why a database: a job of 40,000 images dies sometimes (a laptop closes, cron kills it, the key runs out).
Everything needed to pick up where it stopped — which requests exist, which task ids the API handed back,
which images are on disk — is committed here *before* anything depends on it, so the scheduler can be
rebuilt from this file at any time and never pays twice for the same image. This module, its schema
steps (sqlite_migrations.py) and its ledgers (sqlite_<concern>.py: the concerns the store keeps as
attributes) hold every SQL statement of the SQLite backend; the export, report and status code read
through the methods below.

Durability: WAL journal with ``synchronous=NORMAL``. A committed transaction survives the process being
killed (SIGKILL, OOM, Ctrl-C twice) — that is the promise. A power cut may lose the last few commits (never
corrupt the file); those requests are then polled or resubmitted with the same idempotency key.

Schema (times are wall-clock epoch seconds as REAL; JSON columns hold compact JSON text)::

    job        one row (id = 1): name, manifest_path, output_dir, filename_template, settings (RunSettings
               JSON), fingerprint (of the manifest last synced), sync_gen, created_at, updated_at
    requests   key TEXT PK (content hash, see models.request_key), item_id, variant JSON, metadata JSON (the
               item's own columns), params JSON (GenerationRequest), model (for the next/current attempt:
               differs from params.model after a fallback), n, est_credits, source ("rows.csv row 17"),
               state (models.State), attempts (submissions charged to max_attempts; reset by retry),
               attempt_no (attempts ever made; numbers the idempotency keys), not_before (epoch: do not
               submit before), error_code, error_message, sync_gen, created_at, updated_at.
               Index (state, not_before) — rowid order is manifest order. (m007) Index (sync_gen, state): a
               request is part of the job when its sync_gen is the job's (live.py), whatever its state.
    attempts   id PK, request_key, attempt_no, idempotency_key UNIQUE ("bg1-<store id>-<key>-a<attempt_no>"), model,
               body (JSON actually sent, kept only when uploads rewrote it), state (AttemptState),
               submit_tries, task_id, submitted_at, finished_at, credits_estimated, credits_reserved,
               credits_used, error_code, error_message, result_urls JSON, replayed (0/1)
    images     (request_key, idx) PK (idx 1-based), path UNIQUE (relative to the output folder, with
               extension), url, bytes, sha256, width, height, format, attempt_id, created_at
    runs       (m002) id PK, started_at, finished_at, pid, host, exit_code, reason, summary JSON
    (m005)     images gain check_status (passed/failed/NULL: not checked) and check_reasons
    set_aside  (m005) id PK, request_key, idx, attempt_id, path (under _rejected/), sha256, bytes, width,
               height, format, why ("quality" or "review"), reason, created_at: images taken out of the
               results because a check or a person rejected them; the files are kept
    reviews    (m005) id PK, request_key, idx, sha256 (the image decided on), attempt_id, decision
               (approve/reject), reason, decided_at, acted_at (when a run requeued the request for it)
    uploads    (m003) file_id PK, sha256 (of the content; indexed), file_url, expires_at, size, mime, path
               (local file it came from), uploaded_at, checked_at (last proven live), suspect_at (a task
               using it failed to fetch it), deleted_at. Only files batchgen uploaded; see engine/uploads.py
    keys       (m006) fingerprint PK (first 12 hex of the key's sha256, never the key), label, state
               (active / revoked / out_of_credits), reason, balance (last seen), updated_at. m006 also adds
               `key_fp` to attempts (the key each attempt was sent with; polls use the same key) and to
               uploads (a file belongs to the account that uploaded it). NULL: made before m006, one key.

Migrations are numbered, append-only steps in sqlite_migrations.py (sqlite-utils runs each in its own
transaction and records it in ``_sqlite_migrations``); ``PRAGMA user_version`` mirrors the count. To extend
the schema, append a step there — never edit an applied one.

Read API (for status, export, report):
    ``Store(path)``                 opens (and migrates) the database; use as a context manager
    ``job_record() -> dict|None``   the job row, ``settings`` decoded
    ``counts() -> dict[str,int]``   requests by state (every State present, zeros included)
    ``credit_totals() -> CreditTotals(reserved, used)``  reserved = tasks in flight, used = finished tasks
    ``image_totals() -> (count, bytes)``
    ``failures_by_code() -> list[dict(code, count, messages)]``
    ``iter_requests(states=None, with_history=True) -> Iterator[RequestRecord]``  in manifest order,
        each with ``.attempt_rows`` (AttemptRecord, oldest first) and ``.images`` (ImageRecord, by idx)
    ``run_log.all() -> list[dict]`` one row per `batchgen run`, newest last (sqlite_runlog.py)
Write API (the run engine): ``sync``, ``next_due``, ``start_attempts``, ``record_task``, ``retry_submit``,
``record_outcomes``, ``record_image``, ``finish_request``, ``requeue``, ``fail``, ``requeue_failed``,
``runners.lock`` (the run lock, sqlite_runners.py); quality and review (issue 16), on ``store.reviews``
(sqlite_reviews.py): ``reject_image`` (a failed check), ``decide`` (a person's decision; ``latest`` reads
them), ``open_rejects`` + ``requeue_rejected`` (the next run), ``set_aside_images``, ``counts``.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchgen.errors import BatchgenError, LocalFaultError, StoreFormatError
from batchgen.models import State
from batchgen.store import sqlite_migrations
from batchgen.store.base import BaseStore
from batchgen.store.live import SQLITE_LIVE as LIVE

# The records moved to records.py (shared with the PostgreSQL backend); re-exported here so existing
# imports keep working.
from batchgen.store.records import (  # noqa: F401
    IDEMPOTENCY_PREFIX,
    OPEN_ATTEMPT_STATES,
    AttemptRecord,
    AttemptState,
    CreditTotals,
    ImageRecord,
    NewAttempt,
    Outcome,
    RequestRecord,
    ReviewRecord,
    ReviewRefusedError,
    SetAsideRecord,
    SyncResult,
    UploadRecord,
    idempotency_key,
)
from batchgen.store.records import encode_json as _j
from batchgen.store.sqlite_keystates import SqliteKeyStates
from batchgen.store.sqlite_reviews import SqliteReviews
from batchgen.store.sqlite_runlog import SqliteRunLog
from batchgen.store.sqlite_runners import SqliteRunners
from batchgen.store.sqlite_uploads import SqliteUploads

if TYPE_CHECKING:
    from batchgen.manifest.load import Manifest

_SYNC_CHUNK = 5000
_READ_CHUNK = 2000


# --- the store ------------------------------------------------------------------------------------


SQLITE_HEADER = b"SQLite format 3\x00"
# Tables a batchgen database has from its first migration on.
_OUR_TABLES = frozenset({"job", "requests", "attempts", "images"})


def check_store_file(path: Path, conn: sqlite3.Connection) -> None:
    """Refuse (StoreFormatError) a file that is not a batchgen database, is damaged, or was written by a
    newer batchgen; reads only, so a refused file is left exactly as it was. A missing or empty file is a
    new database."""
    try:
        with path.open("rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        return
    except OSError as error:
        raise LocalFaultError("cannot read the database", str(path), error) from None
    if not head:
        return
    if head != SQLITE_HEADER:
        raise StoreFormatError(f"{path} is not a batchgen database (not an SQLite file); it was left untouched. "
                               "Pass another --db, or move the file away")
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return
        if "_sqlite_migrations" not in tables or not tables >= _OUR_TABLES:
            raise StoreFormatError(f"{path} is an SQLite database of another program, not a batchgen database; "
                                   "it was left untouched. Pass another --db")
        newer = sorted(set(sqlite_migrations.applied(conn)) - set(sqlite_migrations.NAMES))
        if newer:
            raise StoreFormatError(f"{path} was written by a newer batchgen (schema steps {', '.join(newer)} are "
                                   "unknown to this version); it was left untouched. Upgrade batchgen")
        conn.execute("SELECT count(*) FROM job").fetchone()  # one page: cheap, and damage shows early
    except sqlite3.DatabaseError as error:
        if isinstance(error, sqlite3.OperationalError) and "locked" in str(error):
            raise
        raise StoreFormatError(f"{path} is damaged and cannot be read as a batchgen database ({error}); it was "
                               "left untouched. Restore it from a backup, or pass another --db") from None


def _is_fault(error: BaseException) -> bool:
    """An error of the database file or its disk, as opposed to a bug in our SQL (integrity, misuse)."""
    return isinstance(error, sqlite3.DatabaseError) and not isinstance(
        error, sqlite3.IntegrityError | sqlite3.ProgrammingError | sqlite3.InterfaceError)


def _db_fault(path: Path, error: sqlite3.Error) -> BatchgenError:
    """A database that cannot be written or read as a run goes on: a local fault (exit 3, resumable)."""
    text = str(error)
    if "malformed" in text or "not a database" in text:
        return StoreFormatError(f"{path} is damaged ({text}); it was left as it is. Restore it from a backup, "
                                "or pass another --db")
    cause = {"database or disk is full": "no space left on the device"}.get(text, text)
    return LocalFaultError("cannot write the database", str(path), cause)


class Store(BaseStore):
    """The run state of one job. Opening it migrates the schema; methods commit what they change."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise LocalFaultError("cannot create the folder of the database", str(self.path.parent), error) from None
        # Autocommit connection: transactions are explicit (`_tx`), so nothing stays open by accident.
        conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=10.0)
        self.conn = conn
        try:
            # Before anything writes to it: a file that is not ours is refused and left as it was.
            check_store_file(self.path, conn)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=OFF")  # integrity is kept by the code paths; FKs cost time
            sqlite_migrations.apply(conn)
            self.store_id: str = self.conn.execute("SELECT value FROM meta WHERE key='store_id'").fetchone()[0]
        except StoreFormatError:
            conn.close()
            raise
        except sqlite3.DatabaseError as error:
            if not _is_fault(error):
                raise
            conn.close()
            raise _db_fault(self.path, error) from None
        self.runners = SqliteRunners(self)
        self.uploads = SqliteUploads(self)
        self.run_log = SqliteRunLog(self)
        self.key_states = SqliteKeyStates(self)
        self.reviews = SqliteReviews(self)

    # -- plumbing ----------------------------------------------------------------------------------

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.runners.unlock()
        self.conn.close()

    @property
    def location(self) -> str:
        return str(self.path)

    @property
    def target(self) -> str:
        return str(self.path)

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE so two writers queue instead of deadlocking. A database
        that cannot be written (disk full, read-only, I/O error) is a LocalFaultError: the run stops
        resumably, and what was committed before stays committed."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as error:
            raise _db_fault(self.path, error) from None
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException as error:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            if _is_fault(error):
                raise _db_fault(self.path, error) from None  # type: ignore[arg-type]
            raise

    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def applied_migrations(self) -> list[str]:
        return sqlite_migrations.applied(self.conn)

    # -- job and sync --------------------------------------------------------------------------------

    def job_record(self) -> dict[str, Any] | None:
        cur = self.conn.execute("SELECT * FROM job WHERE id = 1")
        row = cur.fetchone()
        if row is None:
            return None
        rec = dict(zip([d[0] for d in cur.description], row, strict=True))
        rec["settings"] = json.loads(rec["settings"]) if rec["settings"] else {}
        return rec

    def sync(self, manifest: Manifest, out_dir: Path | str | None = None) -> SyncResult:
        """Bring the requests table in line with the manifest, in one transaction.

        New requests are inserted as pending; every key the manifest produces is stamped with the job's
        new generation, which is what makes a request live (live.py). Pending or failed requests that are
        no longer in the manifest become `removed` (and come back when they reappear); requests in flight
        or done keep their state and leave the results. `added` and `removed` count requests that became
        live and stopped being live. If the manifest has problems nothing changes. If its fingerprint
        equals the one stored at the last sync the expansion is skipped entirely (the generation, and so
        what is live, stays as it was) — that is how a resumed million-request job reaches its first
        submission at once.
        """
        job = manifest.job
        fingerprint = manifest.fingerprint()
        now = time.time()
        job_row = self.job_record()
        settings_json = job.run.model_dump_json()
        # The folder this run writes to (--out wins over the manifest), so status, export and report find it;
        # a bucket ("s3://bucket/prefix", a string) is recorded as is.
        if isinstance(out_dir, str) and out_dir.startswith("s3://"):
            output_dir = out_dir
        else:
            output_dir = str(Path(out_dir).resolve()) if out_dir is not None else job.output_location()
        meta = (job.name, str(job.manifest_path), output_dir, job.output.filename, settings_json)
        if job_row is not None and job_row["fingerprint"] == fingerprint:
            with self._tx() as c:
                c.execute(
                    "UPDATE job SET name=?, manifest_path=?, output_dir=?, filename_template=?, settings=?, "
                    "updated_at=? WHERE id=1", (*meta, now))
            return SyncResult(0, 0, self._live_total(), skipped=True)
        gen = (job_row["sync_gen"] if job_row else 0) + 1
        with self._tx() as c:
            live_before = c.execute("SELECT COUNT(*) FROM requests WHERE sync_gen = ?", (gen - 1,)).fetchone()[0]
            sql = (
                "INSERT INTO requests (key, item_id, variant, metadata, params, model, n, est_credits, source, "
                "state, sync_gen, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,'pending',?,?,?) "
                "ON CONFLICT(key) DO UPDATE SET sync_gen=excluded.sync_gen, "
                "state=CASE WHEN state='removed' THEN 'pending' ELSE state END, "
                "attempts=CASE WHEN state='removed' THEN 0 ELSE attempts END, "
                "not_before=CASE WHEN state='removed' THEN 0 ELSE not_before END, "
                "updated_at=CASE WHEN state='removed' THEN excluded.updated_at ELSE updated_at END"
            )
            rows: list[tuple[Any, ...]] = []
            for p in manifest.requests():
                r = p.request
                rows.append((p.key, p.item_id, _j(p.variant), _j(p.metadata), r.model_dump_json(exclude_none=True),
                             r.model, r.n, r.estimated_credits(), p.source, gen, now, now))
                if len(rows) >= _SYNC_CHUNK:
                    c.executemany(sql, rows)
                    rows.clear()
            if rows:
                c.executemany(sql, rows)
            manifest.raise_if_problems()  # raises inside the transaction: rolled back, nothing changed
            # Live before and not stamped now: no longer in the manifest, whatever their state (live.py).
            dropped = c.execute("SELECT COUNT(*) FROM requests WHERE sync_gen = ?", (gen - 1,)).fetchone()[0]
            live_now = c.execute("SELECT COUNT(*) FROM requests WHERE sync_gen = ?", (gen,)).fetchone()[0]
            # Never submitted again; in-flight ones are still collected, done ones keep their images.
            c.execute("UPDATE requests SET state='removed', updated_at=? WHERE sync_gen < ? "
                      "AND state IN ('pending', 'failed')", (now, gen))
            if job_row is None:
                c.execute(
                    "INSERT INTO job (id, name, manifest_path, output_dir, filename_template, settings, fingerprint, "
                    "sync_gen, created_at, updated_at) VALUES (1,?,?,?,?,?,?,?,?,?)",
                    (*meta, fingerprint, gen, now, now))
            else:
                c.execute(
                    "UPDATE job SET name=?, manifest_path=?, output_dir=?, filename_template=?, settings=?, "
                    "fingerprint=?, sync_gen=?, updated_at=? WHERE id=1", (*meta, fingerprint, gen, now))
        return SyncResult(added=live_now - (live_before - dropped), removed=dropped, total=live_now)

    def _live_total(self) -> int:
        return int(self.conn.execute(f"SELECT COUNT(*) FROM requests WHERE {LIVE}").fetchone()[0])

    # -- reads ---------------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Live requests by state; `removed` counts every request the manifest no longer produces, whatever
        its state (live.py)."""
        out = {s.value: 0 for s in State}
        for state, count in self.conn.execute(f"SELECT state, COUNT(*) FROM requests WHERE {LIVE} GROUP BY state"):
            out[state] = count
        out[State.REMOVED.value] = int(self.conn.execute(
            f"SELECT COUNT(*) FROM requests WHERE NOT ({LIVE})").fetchone()[0])
        return out

    def credit_totals(self) -> CreditTotals:
        reserved = self.conn.execute(
            "SELECT COALESCE(SUM(COALESCE(credits_reserved, credits_estimated, 0)), 0) FROM attempts "
            "WHERE state IN ('sending', 'running')").fetchone()[0]
        # Completed attempts carry what they were charged (abandoned ones too: expired results were paid);
        # failed tasks are refunded and carry 0.
        used = self.conn.execute("SELECT COALESCE(SUM(credits_used), 0) FROM attempts").fetchone()[0]
        return CreditTotals(reserved=float(reserved), used=float(used))

    def image_totals(self) -> tuple[int, int]:
        count, size = self.conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM images WHERE request_key IN "
            f"(SELECT key FROM requests WHERE {LIVE})").fetchone()
        return int(count), int(size)

    def failures_by_code(self, messages_per_code: int = 3) -> list[dict[str, Any]]:
        """Failed requests grouped by error code, most frequent first, with their distinct messages."""
        groups: list[dict[str, Any]] = []
        for code, count in self.conn.execute(
            "SELECT COALESCE(error_code, 'unknown'), COUNT(*) FROM requests WHERE state='failed' "
            f"AND {LIVE} GROUP BY 1 ORDER BY 2 DESC, 1"
        ).fetchall():
            msgs = [
                {"message": m, "count": n}
                for m, n in self.conn.execute(
                    "SELECT COALESCE(error_message, ''), COUNT(*) FROM requests WHERE state='failed' "
                    f"AND {LIVE} AND COALESCE(error_code, 'unknown')=? GROUP BY 1 ORDER BY 2 DESC LIMIT ?",
                    (code, messages_per_code))
            ]
            groups.append({"code": code, "count": count, "messages": msgs})
        return groups

    def iter_requests(self, states: Iterable[str] | None = None, with_history: bool = True) -> Iterator[RequestRecord]:
        """The live requests in manifest order (live.py), streaming in chunks; with `states`, every request
        in those states, live or not (the engine's and the tests' view)."""
        wanted = [str(s) for s in states] if states is not None else [s.value for s in State if s != State.REMOVED]
        marks = ",".join("?" * len(wanted))
        live = f" AND +{LIVE}" if states is None else ""
        last = 0
        while True:
            cur = self.conn.execute(
                # `+state`: walk the table in rowid order; using the state index would sort every chunk anew.
                f"SELECT rowid, * FROM requests WHERE rowid > ? AND +state IN ({marks}){live} ORDER BY rowid LIMIT ?",
                (last, *wanted, _READ_CHUNK))
            names = [d[0] for d in cur.description]
            chunk = [self._request_record(dict(zip(names, row, strict=True))) for row in cur.fetchall()]
            if not chunk:
                return
            last = chunk[-1].seq
            if with_history:
                by_key = {r.key: r for r in chunk}
                keys = list(by_key)
                qs = ",".join("?" * len(keys))
                for a in self._attempt_rows(f"request_key IN ({qs}) ORDER BY request_key, attempt_no", keys):
                    by_key[a.request_key].attempt_rows.append(a)
                for img in self._image_rows(f"request_key IN ({qs}) ORDER BY request_key, idx", keys):
                    by_key[img.request_key].images.append(img)
            yield from chunk

    def field_names(self) -> tuple[list[str], list[str]]:
        """The item fields and matrix variables the job's requests use, each in first-seen order (SQLite's
        json_each does in C what decoding every request would do in Python)."""
        out: list[list[str]] = []
        for column in ("metadata", "variant"):
            rows = self.conn.execute(
                f"SELECT j.key FROM requests r, json_each(r.{column}) j WHERE r.{LIVE} "
                "GROUP BY j.key ORDER BY MIN(r.rowid), MIN(j.id)").fetchall()
            out.append([str(k) for (k,) in rows])
        return out[0], out[1]

    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                      (key, value))

    def last_change(self) -> float:
        """When anything an export shows last changed (a request's state, an attempt, an image, a review)."""
        row = self.conn.execute(
            "SELECT MAX(t) FROM (SELECT MAX(updated_at) AS t FROM requests UNION ALL "
            "SELECT MAX(MAX(COALESCE(finished_at, 0)), MAX(COALESCE(submitted_at, 0))) FROM attempts "
            "UNION ALL SELECT MAX(created_at) FROM images UNION ALL SELECT MAX(decided_at) FROM reviews)").fetchone()
        return float(row[0] or 0.0)

    def get_request(self, key: str) -> RequestRecord | None:
        cur = self.conn.execute("SELECT rowid, * FROM requests WHERE key = ?", (key,))
        row = cur.fetchone()
        if row is None:
            return None
        rec = self._request_record(dict(zip([d[0] for d in cur.description], row, strict=True)))
        rec.attempt_rows = self._attempt_rows("request_key = ? ORDER BY attempt_no", [key])
        rec.images = self._image_rows("request_key = ? ORDER BY idx", [key])
        return rec

    def images_for(self, key: str) -> list[ImageRecord]:
        return self._image_rows("request_key = ? ORDER BY idx", [key])

    def images_since(self, since: float) -> list[ImageRecord]:
        return self._image_rows("created_at >= ? ORDER BY created_at", [since])

    def reopen_downloads(self, keys: Sequence[str]) -> int:
        now = time.time()
        with self._tx() as c:
            return sum(c.execute("UPDATE requests SET state='completed', updated_at=? WHERE key=? AND state='done'",
                                 (now, key)).rowcount for key in keys)

    def sample_images(self, limit: int) -> list[ImageRecord]:
        half = max(1, limit // 2)
        return self._image_rows("rowid IN (SELECT rowid FROM images ORDER BY rowid LIMIT ?) OR rowid IN "
                                "(SELECT rowid FROM images ORDER BY rowid DESC LIMIT ?)", [half, half])

    @staticmethod
    def _request_record(d: dict[str, Any]) -> RequestRecord:
        return RequestRecord(
            key=d["key"], seq=d["rowid"], item_id=d["item_id"], variant=json.loads(d["variant"]),
            metadata=json.loads(d["metadata"]), params=json.loads(d["params"]), model=d["model"], n=d["n"],
            est_credits=d["est_credits"], source=d["source"], state=State(d["state"]), attempts=d["attempts"],
            attempt_no=d["attempt_no"], not_before=d["not_before"], error_code=d["error_code"],
            error_message=d["error_message"], created_at=d["created_at"], updated_at=d["updated_at"])

    def _attempt_rows(self, where: str, args: Sequence[Any]) -> list[AttemptRecord]:
        cur = self.conn.execute(f"SELECT * FROM attempts WHERE {where}", tuple(args))
        names = [d[0] for d in cur.description]
        out = []
        for row in cur.fetchall():
            d = dict(zip(names, row, strict=True))
            out.append(AttemptRecord(
                id=d["id"], request_key=d["request_key"], attempt_no=d["attempt_no"],
                idempotency_key=d["idempotency_key"], model=d["model"], state=d["state"],
                submit_tries=d["submit_tries"], task_id=d["task_id"], submitted_at=d["submitted_at"],
                finished_at=d["finished_at"], credits_estimated=d["credits_estimated"],
                credits_reserved=d["credits_reserved"], credits_used=d["credits_used"], error_code=d["error_code"],
                error_message=d["error_message"], result_urls=json.loads(d["result_urls"] or "[]"),
                replayed=bool(d["replayed"]), body=json.loads(d["body"]) if d["body"] else None,
                key_fp=d.get("key_fp")))
        return out

    def _image_rows(self, where: str, args: Sequence[Any]) -> list[ImageRecord]:
        cur = self.conn.execute(
            "SELECT request_key, idx, path, url, bytes, sha256, width, height, format, attempt_id, created_at, "
            f"check_status, check_reasons FROM images WHERE {where}", tuple(args))
        return [ImageRecord(*row) for row in cur.fetchall()]

    # -- the run engine's transitions ------------------------------------------------------------------

    def next_due(self, limit: int, now: float | None = None) -> list[RequestRecord]:
        """Up to `limit` pending requests whose not_before has passed, oldest first (index only)."""
        now = time.time() if now is None else now
        cur = self.conn.execute(
            "SELECT rowid, * FROM requests WHERE state='pending' AND not_before <= ? "
            "ORDER BY not_before, rowid LIMIT ?", (now, limit))
        names = [d[0] for d in cur.description]
        return [self._request_record(dict(zip(names, row, strict=True))) for row in cur.fetchall()]

    def next_not_before(self) -> float | None:
        """When the earliest waiting pending request becomes due (None when none is pending)."""
        row = self.conn.execute("SELECT MIN(not_before) FROM requests WHERE state='pending'").fetchone()
        return None if row[0] is None else float(row[0])

    def pending_estimate(self) -> float:
        """Estimated credits of the requests still to submit (catalogue prices; the API's figures rule)."""
        row = self.conn.execute(f"SELECT COALESCE(SUM(est_credits), 0) FROM requests WHERE state='pending' AND {LIVE}")
        return float(row.fetchone()[0])

    def has_pending(self) -> bool:
        return self.conn.execute("SELECT 1 FROM requests WHERE state='pending' LIMIT 1").fetchone() is not None

    def waiting_retry(self, now: float) -> int:
        return int(self.conn.execute(f"SELECT COUNT(*) FROM requests WHERE state='pending' AND not_before > ? "
                                     f"AND {LIVE}", (now,)).fetchone()[0])

    def open_attempts(self) -> list[tuple[RequestRecord, AttemptRecord]]:
        """Requests in flight with their current attempt: `submitted` ones (poll the task, or resubmit
        with the same key if the answer never arrived) and `completed` ones (download)."""
        cur = self.conn.execute(
            "SELECT rowid, * FROM requests WHERE state IN ('submitted', 'completed') ORDER BY rowid")
        names = [d[0] for d in cur.description]
        reqs = [self._request_record(dict(zip(names, row, strict=True))) for row in cur.fetchall()]
        out = []
        for req in reqs:
            rows = self._attempt_rows("request_key = ? ORDER BY attempt_no DESC LIMIT 1", [req.key])
            if rows:
                out.append((req, rows[0]))
        return out

    def idempotency_key(self, request_key: str, attempt_no: int, key_fp: str = "") -> str:
        """The key a new attempt is sent with (an existing attempt's key is on its row)."""
        return idempotency_key(request_key, attempt_no, self.store_id, key_fp)

    def start_attempts(self, items: Sequence[NewAttempt]) -> list[int]:
        """Commit attempt rows (state `sending`) and mark their requests submitted — before any call."""
        now = time.time()
        ids = []
        with self._tx() as c:
            for a in items:
                cur = c.execute(
                    "INSERT INTO attempts (request_key, attempt_no, idempotency_key, model, body, state, submitted_at, "
                    "credits_estimated, key_fp) VALUES (?,?,?,?,?,'sending',?,?,?)",
                    (a.request_key, a.attempt_no,
                     self.idempotency_key(a.request_key, a.attempt_no, (a.key_fp or "") if a.scoped else ""),
                     a.model, _j(a.body) if a.body is not None else None, now, a.credits_estimated, a.key_fp))
                ids.append(int(cur.lastrowid or 0))
                c.execute(
                    "UPDATE requests SET state='submitted', attempts=attempts+1, attempt_no=?, model=?, "
                    "error_code=NULL, error_message=NULL, updated_at=? WHERE key=?",
                    (a.attempt_no, a.model, now, a.request_key))
        return ids

    def record_task(self, attempt_id: int, task_id: str, credits_reserved: float | None, replayed: bool) -> None:
        """The API accepted the submit: its task id goes to disk before anything polls it."""
        self.record_tasks([(attempt_id, task_id, credits_reserved, replayed)])

    def record_tasks(self, accepted: Sequence[tuple[int, str, float | None, bool]]) -> None:
        """Several accepted submits (attempt id, task id, credits reserved, replayed) in one transaction: the
        scheduler commits the answers of one event-loop turn together, before anything waits on them."""
        with self._tx() as c:
            c.executemany(
                "UPDATE attempts SET state='running', task_id=?, credits_reserved=?, replayed=?, "
                "submit_tries=submit_tries+1 WHERE id=?",
                [(task_id, reserved, int(replayed), attempt_id) for attempt_id, task_id, reserved, replayed
                 in accepted])

    def retry_submit(self, attempt_id: int, request_key: str, not_before: float, code: str | None,
                     message: str | None) -> None:
        """A submit call failed transiently: the same attempt (same idempotency key) is sent again later."""
        with self._tx() as c:
            c.execute("UPDATE attempts SET submit_tries=submit_tries+1, error_code=?, error_message=? WHERE id=?",
                      (code, message, attempt_id))
            c.execute("UPDATE requests SET not_before=?, updated_at=? WHERE key=?",
                      (not_before, time.time(), request_key))

    def record_outcomes(self, outcomes: Sequence[Outcome]) -> None:
        """Apply the results of one poll (one transaction for a whole batch)."""
        if not outcomes:
            return
        now = time.time()
        with self._tx() as c:
            for o in outcomes:
                if o.kind == "running":
                    if o.credits_reserved is not None:
                        c.execute("UPDATE attempts SET credits_reserved=? WHERE id=?",
                                  (o.credits_reserved, o.attempt_id))
                elif o.kind == "completed":
                    c.execute(
                        "UPDATE attempts SET state='completed', finished_at=?, result_urls=?, "
                        "credits_reserved=COALESCE(?, credits_reserved), "
                        "credits_used=COALESCE(?, ?, credits_reserved), error_code=NULL, error_message=NULL "
                        "WHERE id=?",
                        (now, _j(list(o.result_urls)), o.credits_reserved, o.credits_used, o.credits_reserved,
                         o.attempt_id))
                    c.execute("UPDATE requests SET state='completed', updated_at=? WHERE key=?", (now, o.request_key))
                elif o.kind in ("requeue", "failed"):
                    c.execute(
                        "UPDATE attempts SET state='failed', finished_at=?, credits_used=0, error_code=?, "
                        "error_message=? WHERE id=?", (now, o.error_code, o.error_message, o.attempt_id))
                    if o.kind == "requeue":
                        self._requeue(c, o.request_key, o.not_before, o.error_code, o.error_message, o.model,
                                      o.consume_attempt, now)
                    else:
                        self._fail(c, o.request_key, o.error_code, o.error_message, now)

    def abandon_attempt(self, attempt_id: int, code: str, message: str) -> None:
        """An attempt whose results cannot be used (expired URLs, lost task); a new attempt follows."""
        with self._tx() as c:
            self._abandon(c, attempt_id, code, message, time.time())

    def release_open_attempts(self, code: str, message: str) -> int:
        """Give up every attempt in flight and requeue its request, without charging it an attempt.

        Only for tasks that can no longer exist: the built-in emulator keeps its tasks in memory, so a
        resumed `--emulator` run faces a fresh emulator that never heard of them. Never used against a real
        API, where the task ids are polled instead."""
        return self._give_up_open("r.state IN ('submitted', 'completed')", (), code, message, charge=False)

    def abandon_tasks_of(self, key_fps: Sequence[str], code: str, message: str) -> int:
        """The user's way out for tasks only a lost (revoked, deleted) key may look at: their attempts are
        abandoned and their requests pending again, so the next run submits them with its own keys. The task
        ids stay recorded, and each task counts as spent at its reservation: its account may still have run
        and charged it, and --max-credits must not forget that. Completed requests need no key (their results
        are downloaded as they are), so only `submitted` ones are touched."""
        if not key_fps:
            return 0
        return self._give_up_open("r.state = 'submitted' AND a.state IN ('sending', 'running') AND a.key_fp IN "
                                  f"({','.join('?' * len(key_fps))})", tuple(key_fps), code, message, charge=True)

    def _give_up_open(self, where: str, args: Sequence[Any], code: str, message: str, *, charge: bool) -> int:
        """Abandon the current attempt of the requests `where` picks and requeue them, the attempt unused;
        `charge`: the task may have been paid, so it counts as spent at its reservation."""
        now = time.time()
        with self._tx() as c:
            rows = c.execute("SELECT a.id, r.key FROM requests r JOIN attempts a ON a.request_key = r.key AND "
                             f"a.attempt_no = r.attempt_no WHERE {where}", tuple(args)).fetchall()
            for attempt_id, key in rows:
                if charge:
                    c.execute("UPDATE attempts SET credits_used = COALESCE(credits_used, credits_reserved, "
                              "credits_estimated, 0) WHERE id=?", (attempt_id,))
                self._abandon(c, attempt_id, code, message, now)
                self._requeue(c, key, 0.0, code, message, None, False, now)
        return len(rows)

    def update_result_urls(self, attempt_id: int, urls: Sequence[str]) -> None:
        with self._tx() as c:
            c.execute("UPDATE attempts SET result_urls=? WHERE id=?", (_j(list(urls)), attempt_id))

    def record_image(self, img: ImageRecord, done: bool) -> None:
        """An image is on disk (renamed into place): record it; `done` marks the request done with it."""
        self.record_images([(img, done)])

    def record_images(self, saved: Sequence[tuple[ImageRecord, bool]]) -> None:
        """Several saved images in one transaction (`done`: the request is done with that image)."""
        with self._tx() as c:
            c.executemany(
                "INSERT INTO images (request_key, idx, path, url, bytes, sha256, width, height, format, attempt_id, "
                "created_at, check_status, check_reasons) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(request_key, idx) DO UPDATE SET "
                "path=excluded.path, url=excluded.url, bytes=excluded.bytes, sha256=excluded.sha256, "
                "width=excluded.width, height=excluded.height, format=excluded.format, "
                "attempt_id=excluded.attempt_id, created_at=excluded.created_at, "
                "check_status=excluded.check_status, check_reasons=excluded.check_reasons",
                [(img.request_key, img.idx, img.path, img.url, img.bytes, img.sha256, img.width, img.height,
                  img.format, img.attempt_id, img.created_at, img.check_status, img.check_reasons)
                 for img, _ in saved])
            now = time.time()
            c.executemany("UPDATE requests SET state='done', error_code=NULL, error_message=NULL, updated_at=? "
                          "WHERE key=?", [(now, img.request_key) for img, done in saved if done])

    def path_owner(self, paths: Sequence[str]) -> str | None:
        """The request that already saved an image under one of these relative paths, if any."""
        row = self.conn.execute(f"SELECT request_key FROM images WHERE path IN ({','.join('?' * len(paths))}) "
                                "LIMIT 1", tuple(paths)).fetchone()
        return None if row is None else str(row[0])

    def is_live(self, key: str) -> bool:
        return self.conn.execute(f"SELECT 1 FROM requests WHERE key=? AND {LIVE}", (key,)).fetchone() is not None

    def move_image(self, key: str, idx: int, path: str) -> None:
        with self._tx() as c:
            c.execute("UPDATE images SET path=? WHERE request_key=? AND idx=?", (path, key, idx))

    def live_images_under(self, prefix: str) -> list[ImageRecord]:
        # substr, not LIKE: `_` is a LIKE wildcard and the folder names start with one.
        return self._image_rows(f"substr(path, 1, ?) = ? AND request_key IN (SELECT key FROM requests WHERE {LIVE}) "
                                "ORDER BY request_key, idx", [len(prefix), prefix])

    def finish_request(self, key: str) -> None:
        with self._tx() as c:
            c.execute("UPDATE requests SET state='done', error_code=NULL, error_message=NULL, updated_at=? WHERE key=?",
                      (time.time(), key))

    def requeue(self, key: str, not_before: float, code: str | None, message: str | None, *,
                model: str | None = None, consume_attempt: bool = True) -> None:
        with self._tx() as c:
            self._requeue(c, key, not_before, code, message, model, consume_attempt, time.time())

    def defer(self, key: str, not_before: float, code: str | None, message: str | None) -> None:
        """A pending request could not be sent yet (its uploads failed transiently): try after not_before."""
        with self._tx() as c:
            c.execute("UPDATE requests SET not_before=?, error_code=?, error_message=?, updated_at=? WHERE key=?",
                      (not_before, code, message, time.time(), key))

    def fail(self, key: str, code: str | None, message: str | None) -> None:
        with self._tx() as c:
            self._fail(c, key, code, message, time.time())

    @staticmethod
    def _requeue(c: sqlite3.Connection, key: str, not_before: float, code: str | None, message: str | None,
                 model: str | None, consume_attempt: bool, now: float) -> None:
        # A request the manifest no longer produces (its row went while it was in flight) is not sent again:
        # it is `removed`, and comes back pending if its row does.
        c.execute(
            f"UPDATE requests SET state=CASE WHEN {LIVE} THEN 'pending' ELSE 'removed' END, not_before=?, "
            "error_code=?, error_message=?, model=COALESCE(?, model), attempts=attempts - ?, updated_at=? "
            "WHERE key=?",
            (not_before, code, message, model, 0 if consume_attempt else 1, now, key))

    @staticmethod
    def _fail(c: sqlite3.Connection, key: str, code: str | None, message: str | None, now: float) -> None:
        c.execute("UPDATE requests SET state='failed', error_code=?, error_message=?, updated_at=? WHERE key=?",
                  (code, message, now, key))

    @staticmethod
    def _abandon(c: sqlite3.Connection, attempt_id: int, code: str | None, message: str | None, now: float) -> None:
        c.execute("UPDATE attempts SET state='abandoned', error_code=?, error_message=?, finished_at=? WHERE id=?",
                  (code, message, now, attempt_id))

    def requeue_failed(self, codes: list[str] | None = None) -> int:
        """`batchgen retry`: failed requests (optionally only these error codes) go back to pending with a
        fresh attempt budget and their original model. History (attempts, errors) is kept."""
        sql = ("UPDATE requests SET state='pending', attempts=0, not_before=0, "
               f"model=json_extract(params, '$.model'), updated_at=? WHERE state='failed' AND {LIVE}")
        args: list[Any] = [time.time()]
        if codes:
            sql += f" AND error_code IN ({','.join('?' * len(codes))})"
            args.extend(codes)
        with self._tx() as c:
            return int(c.execute(sql, args).rowcount)
