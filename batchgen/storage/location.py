"""Which storage a job's outputs go to: `s3://bucket/prefix` is a bucket, anything else a local folder.

`output.folder` in the manifest and `--out` on the command line take either. The chosen location, as one
string, is what the store records for the job (an absolute folder, or the bucket URL), so `status`,
`export` and `report` find the outputs where the run put them. The endpoint and region of a bucket are not
secrets and are recorded too (`STORAGE_META`); credentials never are: they come from the AWS chain.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from batchgen.errors import BatchgenError, ConfigError
from batchgen.storage.base import Storage

if TYPE_CHECKING:
    from batchgen.store.base import BaseStore as Store

STORAGE_META = "output_storage"  # store meta key: {"endpoint_url": ..., "region": ...} of a bucket


def is_bucket_url(value: str | Path | None) -> bool:
    return isinstance(value, str) and value.startswith("s3://")


def resolve_location(value: str | Path, base_dir: Path | None = None) -> str:
    """A bucket URL as is (normalised), or a folder made absolute (relative to `base_dir`, else the cwd)."""
    if is_bucket_url(value):
        from batchgen.storage.s3 import SCHEME, parse_bucket_url

        bucket, prefix = parse_bucket_url(str(value))
        return SCHEME + bucket + (f"/{prefix}" if prefix else "")
    path = Path(value)
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    return str(path.resolve())


def open_storage(location: str, *, endpoint_url: str | None = None, region: str | None = None,
                 create_bucket: bool = True, time_scale: float = 1.0, patience_s: float | None = None,
                 durable: bool = True) -> Storage:
    """The storage for `location` (from `resolve_location`). A bucket is checked (created if missing);
    `time_scale` shrinks its retry waits like the run's other client-side waits, and `patience_s` (the
    run's patience) bounds how long one call waits out throttling before the run stops resumably.
    `durable=False`: a local folder does not fsync each image (write_atomic)."""
    if is_bucket_url(location):
        from batchgen.storage.s3 import RetryPolicy, S3Storage

        return S3Storage(location, endpoint_url=endpoint_url, region=region, create_bucket=create_bucket,
                         retry=RetryPolicy().scaled(time_scale, patience_s))
    from batchgen.storage.local import LocalStorage

    return LocalStorage(Path(location), durable=durable)


def storage_for_job(store: Store, location: str | None = None) -> Storage:
    """The storage of the job in `store`: its recorded location (or `location`), with the recorded
    endpoint and region of a bucket. Used by export, provenance and report after the run."""
    job = store.job_record() or {}
    where = location or job.get("output_dir")
    if not where:
        # A job whose run never recorded its folder: SQLite's default is the database's own folder; a shared
        # store has no such place, so the user must say where the outputs are.
        db_path = getattr(store, "path", None)
        if db_path is None:
            raise ConfigError(f"{store.location}: the job has no output folder on record; give it with --out")
        where = str(Path(db_path).parent)
    settings = json.loads(store.get_meta(STORAGE_META) or "{}")
    return open_storage(where, endpoint_url=settings.get("endpoint_url"), region=settings.get("region"),
                        create_bucket=False)


MOVE_SAMPLE = 20  # saved images looked for at a new output location before the job is taken to have moved


def output_move(store: Store, location: str) -> tuple[str, list[str]] | None:
    """(the recorded location, a sample of saved image paths) when a run would record `location` as the
    output of a job whose images are somewhere else on record; None when nothing would move. Reads the
    store only (on the store's own thread); `check_output_move` looks at the new place."""
    job = store.job_record() or {}
    recorded = job.get("output_dir")
    if not recorded or _same_location(str(recorded), location):
        return None
    sample = [img.path for img in store.sample_images(MOVE_SAMPLE)]
    return (str(recorded), sample) if sample else None  # nothing saved yet: the job may write anywhere


def check_output_move(where: str, recorded: str, sample: list[str], location: str, *,
                      endpoint_url: str | None = None, region: str | None = None) -> str:
    """A note when the job's saved images (`sample`, from `output_move`) are already at `location` (the
    folder or bucket was moved, or copied); else ConfigError: a run pointed elsewhere would report every
    image missing and resume nothing that is there. One stat or HEAD per sampled image (`MOVE_SAMPLE`)."""
    try:
        storage = open_storage(location, endpoint_url=endpoint_url, region=region, create_bucket=False)
        with storage:
            found = sum(storage.exists(path) for path in sample)
    except (BatchgenError, OSError):
        found = 0  # a bucket that does not exist, say: the images are not there
    if found == len(sample):
        return f"the job's output moved from {recorded} to {location} (its images are there); recorded the new place"
    raise ConfigError(
        f"{where}: this job's images are in {recorded}, but this run would write to {location}, "
        f"where {found} of the {len(sample)} looked for are. Run with --out {recorded} (or set "
        "output.folder back), or move the folder there first; a new job in a new folder needs its own "
        "database (--db)")


def _same_location(a: str, b: str) -> bool:
    if is_bucket_url(a) or is_bucket_url(b):
        return a.rstrip("/") == b.rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def record_storage(store: Store, endpoint_url: str | None, region: str | None) -> None:
    """Remember a bucket's endpoint and region for the commands that read the job later."""
    store.set_meta(STORAGE_META, json.dumps({"endpoint_url": endpoint_url, "region": region}))
