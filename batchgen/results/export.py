"""`batchgen export`: the job's results as a flat file a catalogue team can import — one row per image.

A shop system does not read SQLite; it reads a CSV keyed by its own SKUs. So every row starts with the
item's own columns (whatever the manifest's CSV or inline items had, in the input's order), then one
column per matrix variable, then batchgen's columns (`COLUMNS_PER_IMAGE` / `COLUMNS_PER_REQUEST`), ending
with the image's path relative to the output folder. Requests without images (failed, or not finished
yet) still get one row, with an empty path, so nothing silently disappears from the import.

Names: batchgen's columns always have the names below, so tooling can rely on them. An item column with
the same name as one of them is written as `item.<name>`; a matrix variable that collides with a
batchgen or item column (typically `size`, which is also a request parameter) as `variant.<name>`.

CSV cells a spreadsheet would run as a formula (leading `=`, `+`, `-`, `@`, tab, CR or LF) get a leading
`'` (`neutralise_cell`): a prompt or an item name is untrusted text, and `=HYPERLINK(...)` in a shop
export is a known attack. JSONL carries the values unmodified (JSON readers do not evaluate them).

Rows stream from the store in chunks; a file target is written atomically, a pipe or device straight into
(`atomicfile.open_output`).
`write_run_files` is what the runner calls at the end of every run: `results.csv` and the provenance
index (`provenance.py`) in the output folder, or under the bucket's prefix (through the job's `Storage`).
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from batchgen.errors import BatchgenError, ConfigError
from batchgen.storage.atomicfile import open_output
from batchgen.storage.base import Storage
from batchgen.store.base import BaseStore
from batchgen.store.open import open_store
from batchgen.store.records import AttemptRecord, ImageRecord, RequestRecord, ReviewRecord

FORMATS = ("csv", "jsonl")
RESULTS_NAME = "results.csv"

# batchgen's own columns, after the item's and the variant's. `credits` per image is the request's charge
# shared evenly by its images, so the column sums to what the job cost.
COLUMNS_PER_IMAGE: tuple[str, ...] = (
    "item_id", "model", "size", "prompt", "status", "error_code", "error_message", "credits", "task_id",
    "image_index", "width", "height", "sha256", "check_status", "check_reasons", "review", "review_reason",
    "request_key", "source", "path",
)
COLUMNS_PER_REQUEST: tuple[str, ...] = (
    "item_id", "model", "size", "n", "prompt", "status", "error_code", "error_message", "credits", "task_id",
    "attempts", "images", "request_key", "source", "paths",
)
PATH_SEPARATOR = "|"  # between the paths of one request in per-request CSV rows (JSONL gives a list)

# What a spreadsheet treats as the start of a formula (OWASP "CSV injection"), plus line breaks, which
# some importers split on before the cell is parsed.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\n")


def json_line(value: Any) -> str:
    """One JSONL line: UTF-8 as is, except the characters Python's `str.splitlines` and JavaScript treat
    as line breaks inside a string (NEL, U+2028, U+2029), which are escaped so a line is always a record."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("\x85", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029") + "\n"


def neutralise_cell(value: Any) -> Any:
    """A CSV cell that no spreadsheet will execute: text starting like a formula gets a leading `'`.

    Numbers and None pass through (a negative number is data, and ours are never negative)."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


@dataclass(frozen=True)
class Columns:
    """The export's header: item columns and matrix variables (as (column name, field) pairs), then ours."""

    item: tuple[tuple[str, str], ...]
    variant: tuple[tuple[str, str], ...]
    fixed: tuple[str, ...]

    @property
    def names(self) -> list[str]:
        return [c for c, _ in self.item] + [c for c, _ in self.variant] + list(self.fixed)


def plan_columns(item_fields: Iterable[str], variant_fields: Iterable[str], *, per_request: bool = False) -> Columns:
    """Name the columns; batchgen's keep their names and user columns that collide get a prefix."""
    fixed = COLUMNS_PER_REQUEST if per_request else COLUMNS_PER_IMAGE
    taken = set(fixed)
    item = []
    for f in item_fields:
        name = f"item.{f}" if f in taken else f
        item.append((name, f))
    taken |= {c for c, _ in item}
    variant = []
    for f in variant_fields:
        name = f"variant.{f}" if f in taken else f
        variant.append((name, f))
    return Columns(tuple(item), tuple(variant), fixed)


def ordered(seen: Iterable[str], preferred: Iterable[str]) -> list[str]:
    """`seen` fields in the input's order (`preferred`) first, any others after in their first-seen order."""
    seen_list = list(dict.fromkeys(seen))
    present = set(seen_list)
    head = [f for f in dict.fromkeys(preferred) if f in present]
    return head + [f for f in seen_list if f not in set(head)]


def input_field_order(manifest_path: str | None) -> tuple[list[str], list[str]]:
    """The item fields and matrix variables in the order the manifest gives them, from its first request.

    The store keeps metadata as sorted JSON, so the input's column order (SKU, name, colour, ... as the
    user laid it out) only survives in the manifest. Best effort: a manifest moved, edited into something
    invalid or unreadable since the run gives ([], []), and the export falls back to alphabetical order."""
    if not manifest_path:
        return [], []
    try:
        from batchgen.manifest.load import open_manifest

        requests = open_manifest(Path(manifest_path)).requests()
        try:
            first = next(requests, None)
        finally:
            close = getattr(requests, "close", None)
            if close is not None:
                close()
    except (BatchgenError, OSError, ValueError):
        return [], []
    if first is None:
        return [], []
    return list(first.metadata), list(first.variant)


def discover_columns(store: BaseStore, *, per_request: bool = False) -> Columns:
    """Every item field and matrix variable the job's requests use (a first, cheap pass over the store)."""
    item_fields, variant_fields = store.field_names()
    item_seen, variant_seen = dict.fromkeys(item_fields), dict.fromkeys(variant_fields)
    job = store.job_record() or {}
    item_order, variant_order = input_field_order(job.get("manifest_path"))
    return plan_columns(ordered(item_seen, item_order), ordered(variant_seen, variant_order),
                        per_request=per_request)


def request_credits(req: RequestRecord) -> float:
    """Credits the request was charged across all its attempts (failed tasks are refunded: 0)."""
    return round(sum(a.credits_used or 0.0 for a in req.attempt_rows), 6)


def image_credits(req: RequestRecord) -> float:
    """One image's share of its request's charge (shared evenly), so the images' figures sum to the job's cost;
    a request without images carries its whole charge."""
    total = request_credits(req)
    return round(total / len(req.images), 6) if req.images else total


def producing_attempt(req: RequestRecord, img: ImageRecord | None = None) -> AttemptRecord | None:
    """The attempt that made `img` (or, without an image, the request's latest attempt)."""
    if img is not None and img.attempt_id is not None:
        for a in req.attempt_rows:
            if a.id == img.attempt_id:
                return a
    return req.attempt_rows[-1] if req.attempt_rows else None


def _common(req: RequestRecord, columns: Columns, attempt: AttemptRecord | None) -> dict[str, Any]:
    row: dict[str, Any] = {name: req.metadata.get(field, "") for name, field in columns.item}
    row.update({name: req.variant.get(field, "") for name, field in columns.variant})
    row.update({
        "item_id": req.item_id,
        "model": attempt.model if attempt is not None else req.model,
        "size": req.params.get("size") or "",
        "prompt": req.params.get("prompt", ""),
        "status": req.state.value,
        "error_code": req.error_code or "",
        "error_message": req.error_message or "",
        "task_id": (attempt.task_id if attempt is not None else None) or "",
        "request_key": req.key,
        "source": req.source,
    })
    return row


Reviews = Mapping[tuple[str, int, str], ReviewRecord]  # store.reviews.latest(): (key, idx, sha256) -> decision


def review_of(img: ImageRecord | None, reviews: Reviews | None) -> ReviewRecord | None:
    """The latest decision on exactly this image (its bytes), if a person made one."""
    if img is None or not reviews:
        return None
    return reviews.get((img.request_key, img.idx, img.sha256))


def row_for_image(req: RequestRecord, img: ImageRecord | None, columns: Columns,
                  reviews: Reviews | None = None) -> dict[str, Any]:
    """One per-image row; `img` None gives the row of a request without images (empty path). `reviews`
    (store.reviews.latest) fills the review columns."""
    row = _common(req, columns, producing_attempt(req, img))
    rv = review_of(img, reviews)
    row.update({
        "check_status": (img.check_status or "not_checked") if img is not None else "",
        "check_reasons": (img.check_reasons or "") if img is not None else "",
        "review": ({"approve": "approved", "reject": "rejected"}[rv.decision] if rv else "unreviewed")
        if img is not None else "",
        "review_reason": (rv.reason or "") if rv else "",
    })
    row.update({
        "credits": image_credits(req) if img is not None else request_credits(req),
        "image_index": img.idx if img is not None else "",
        "width": img.width if img is not None and img.width is not None else "",
        "height": img.height if img is not None and img.height is not None else "",
        "sha256": img.sha256 if img is not None else "",
        "path": img.path if img is not None else "",
    })
    return {name: row[name] for name in columns.names}


def row_for_request(req: RequestRecord, columns: Columns) -> dict[str, Any]:
    """One per-request row; `paths` is a list (joined with `PATH_SEPARATOR` in CSV)."""
    row = _common(req, columns, producing_attempt(req, req.images[-1] if req.images else None))
    row.update({
        "n": req.n, "credits": request_credits(req), "attempts": req.attempt_no,
        "images": len(req.images), "paths": [img.path for img in req.images],
    })
    return {name: row[name] for name in columns.names}


def iter_rows(store: BaseStore, columns: Columns, *, per_request: bool = False) -> Iterator[dict[str, Any]]:
    """Rows in manifest order, streamed from the store."""
    reviews = store.reviews.latest()
    for req in store.iter_requests(with_history=True):
        if per_request:
            yield row_for_request(req, columns)
        elif req.images:
            for img in req.images:
                yield row_for_image(req, img, columns, reviews)
        else:
            yield row_for_image(req, None, columns)


def csv_cells(row: dict[str, Any]) -> list[str]:
    """A row's cells as a spreadsheet may safely open them (lists joined, formulas neutralised)."""
    return [neutralise_cell(PATH_SEPARATOR.join(v) if isinstance(v, list) else v) for v in row.values()]


def write_rows(fh: IO[str], fmt: str, columns: Columns, rows: Iterable[dict[str, Any]]) -> int:
    """Write `rows` to `fh` as CSV (neutralised) or JSONL (as is); returns the number of rows."""
    count = 0
    if fmt == "csv":
        writer = csv.writer(fh)
        writer.writerow([neutralise_cell(c) for c in columns.names])
        for row in rows:
            writer.writerow(csv_cells(row))
            count += 1
    else:
        for row in rows:
            fh.write(json_line(row))
            count += 1
    return count


def export_results(db_path: Path | str, *, fmt: str = "csv", output: Path | None = None, per_request: bool = False,
                   job: str | None = None) -> int:
    """Export the job in `db_path` (a path or a postgresql:// URL with `job`) to `output` (atomically, unless
    it is a pipe or device) or stdout; returns the number of rows."""
    if fmt not in FORMATS:
        raise ConfigError(f'unknown export format "{fmt}"; use one of {", ".join(FORMATS)}')
    with open_store(db_path, job) as store:
        columns = discover_columns(store, per_request=per_request)
        rows = iter_rows(store, columns, per_request=per_request)
        if output is None:
            return write_rows(sys.stdout, fmt, columns, rows)
        with open_output(Path(output), newline="" if fmt == "csv" else None, what="cannot write the export") as fh:
            return write_rows(fh, fmt, columns, rows)


def write_run_files(db_path: Path | str, out_dir: Path | Storage, job_name: str | None = None) -> dict[str, int]:
    """The files every run leaves in its output folder or bucket: the provenance index and `results.csv`.

    Both come from one pass over the store and replace the previous pair atomically (a failure leaves the
    previous files in place), and nothing is rewritten when nothing changed since they were last written:
    a nightly run of a large job with nothing new costs nothing. Returns rows written per file name
    (empty when the files were already up to date)."""
    from batchgen.results.provenance import INDEX_NAME, provenance_record
    from batchgen.storage.local import LocalStorage

    storage = out_dir if isinstance(out_dir, Storage) else LocalStorage(Path(out_dir))
    with open_store(db_path, job_name) as store:
        stamp = f"{store.last_change()!r} {storage.location}"
        if store.get_meta("run_files") == stamp and storage.exists(INDEX_NAME) and storage.exists(RESULTS_NAME):
            return {}
        job = store.job_record() or {}
        columns = discover_columns(store)
        images = rows = 0
        reviews = store.reviews.latest()
        with storage.open_text(INDEX_NAME) as index, storage.open_text(RESULTS_NAME, newline="") as results:
            writer = csv.writer(results)
            writer.writerow([neutralise_cell(c) for c in columns.names])
            for req in store.iter_requests(with_history=True):
                for img in req.images:
                    index.write(json_line(provenance_record(job, req, img)))
                    images += 1
                for image in req.images or (None,):
                    writer.writerow(csv_cells(row_for_image(req, image, columns, reviews)))
                    rows += 1
        store.set_meta("run_files", stamp)
    return {INDEX_NAME: images, RESULTS_NAME: rows}
