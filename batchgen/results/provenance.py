"""Provenance: for every image in an output folder, what produced it — enough to trace and regenerate it.

An image found on disk months later (in a shop's media library, attached to a ticket) must lead back to its
prompt, model and parameters, the item and variant it was made for, the API task and what it cost. That
record lives in ONE file per output folder, `index.jsonl`, one JSON object per image, keyed by the
image's `path` (relative to the folder) and its `sha256` (so a copied or renamed file is still found:
`grep <sha256> index.jsonl`).

Why one index and not a `<image>.json` beside each image: a 100,000-image job would otherwise write
100,000 extra files (slow on network drives, clutter in every folder a shop syncs, and a second file to
keep in step with each image), while one JSONL file greps, streams and imports well. The index sits at
the root of the folder, even when the file-name template makes sub-folders, so it is always in one place.

It is rewritten from the store, atomically, at the end of every run (`export.write_run_files`), so it
always describes every image the job has saved, not just the last run's. The store stays the source of
truth; a run killed before its end leaves the previous index, and the next run rewrites it.

Record fields (`provenance_record`): path, sha256, bytes, width, height, format, index (1-based image
number within its request), job, manifest, item_id, variant, metadata (the item's own columns),
request_key, source (manifest row), request (the generation parameters as the manifest defined them:
prompt, model, size, n, image_urls, ... — the body to send again), model (the one that made the image:
differs from request.model after a fallback), api_body (only when the body sent differed from the
parameters, e.g. uploaded reference URLs), task_id, attempt (number), credits (the task's charge),
url (the result URL it was downloaded from; it expires), submitted_at, completed_at, downloaded_at (ISO
8601 UTC), batchgen (version). Never the API key: the store does not hold it.
"""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from batchgen import __version__
from batchgen.storage.base import Storage
from batchgen.store.sqlite import ImageRecord, RequestRecord

INDEX_NAME = "index.jsonl"


def iso_utc(epoch_s: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC with milliseconds (None stays None)."""
    if epoch_s is None:
        return None
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def provenance_record(job: dict[str, Any], req: RequestRecord, img: ImageRecord) -> dict[str, Any]:
    """Everything known about how `img` was made (pure: built from store records)."""
    attempt = next((a for a in req.attempt_rows if a.id == img.attempt_id), None)
    record: dict[str, Any] = {
        "path": img.path, "sha256": img.sha256, "bytes": img.bytes, "width": img.width, "height": img.height,
        "format": img.format, "index": img.idx,
        "job": job.get("name"), "manifest": job.get("manifest_path"),
        "item_id": req.item_id, "variant": req.variant, "metadata": req.metadata,
        "request_key": req.key, "source": req.source, "request": req.params,
        "model": attempt.model if attempt else req.model,
        "task_id": attempt.task_id if attempt else None,
        "attempt": attempt.attempt_no if attempt else None,
        "credits": attempt.credits_used if attempt else None,
        "url": img.url,
        "submitted_at": iso_utc(attempt.submitted_at if attempt else None),
        "completed_at": iso_utc(attempt.finished_at if attempt else None),
        "downloaded_at": iso_utc(img.created_at),
        "batchgen": __version__,
    }
    if attempt is not None and attempt.body is not None:
        record["api_body"] = attempt.body
    return record


def find(out_dir: Path | Storage, path_or_sha256: str) -> dict[str, Any] | None:
    """The index record of an image, by its relative path or its sha256 (streams a local index; an index
    in a bucket is fetched whole first). FileNotFoundError when there is no index."""
    if isinstance(out_dir, Storage):
        data = out_dir.read_bytes(INDEX_NAME)
        if data is None:
            raise FileNotFoundError(out_dir.describe(INDEX_NAME))
        lines: Any = io.StringIO(data.decode("utf-8"))
    else:
        lines = (Path(out_dir) / INDEX_NAME).open(encoding="utf-8")
    with lines as fh:
        for line in fh:
            record = json.loads(line)
            if path_or_sha256 in (record.get("path"), record.get("sha256")):
                return dict(record)
    return None
