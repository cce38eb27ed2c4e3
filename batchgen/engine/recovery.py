"""Images a machine that went down may have taken back, found and downloaded again by the next run.

An SQLite store commits with `synchronous=NORMAL`: a commit survives the process being killed, but a power
cut or a kernel crash may take back the last ones, and the run after it polls or downloads those again.
A local folder's images are written the same way (`write_atomic` without its fsync: complete or absent if
the process dies, but only in the page cache for a few seconds), so a commit that did reach the disk may
name an image whose bytes did not. The next run looks for exactly those: if the last run did not finish
(no end in the run log: killed, or the machine went down), each image it recorded is checked to be on disk
with its recorded size (one stat each), and the requests of any that is not are reopened — the engine then
checks their images by hash and downloads again what is missing, from the attempt's result URLs, as it
does for a run killed between a task's end and its downloads. Nothing is submitted again.

A PostgreSQL store's commits are durable (the server fsyncs them), so with it each image is fsynced
before its rename instead, and nothing here runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batchgen.storage.base import Storage
    from batchgen.store.base import BaseStore


def images_durable(store: BaseStore) -> bool:
    """Whether a run on `store` fsyncs each image: only where the store's own commits are durable."""
    return store.shared


def reopen_lost_images(store: BaseStore, storage: Storage) -> list[str]:
    """Before a run starts: the paths of images the last run recorded that are not on disk whole, whose
    requests are reopened for download (empty when that run finished, or when nothing is missing)."""
    if images_durable(store) or not storage.writes_are_local:
        return []
    runs = store.run_log.all()
    if not runs or runs[-1]["finished_at"] is not None:
        return []
    lost = [img for img in store.images_since(float(runs[-1]["started_at"]))
            if storage.size_of(img.path) != img.bytes]
    if lost:
        store.reopen_downloads(sorted({img.request_key for img in lost}))
    return [img.path for img in lost]
