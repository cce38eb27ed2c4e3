"""A file name belongs to the request the manifest asks for now.

An edited row is a new request under the same file name (its key changes, its name does not). The request
it replaced is no longer part of the job (store/live.py), but its image was paid for: it is moved aside to
`_superseded/<name>.<sha12><ext>`, never deleted, and the current request's image takes the name. If the
old row comes back, its request is live again with its images, and they get their names back at the start
of the next run, the other version moving aside in turn. A name both requests of the current manifest
want (a template that names two items alike) still gets the later one's key appended
(`engine/downloads.py`).

Each move is made before it is recorded, and both steps are safe to repeat: a run killed between them
finds the image recorded at its old path, the move answers "not there", and the record follows.
"""

from __future__ import annotations

import asyncio
from pathlib import PurePosixPath

from batchgen.storage.aside import SUPERSEDED_DIR, aside_relpath, original_relpath
from batchgen.storage.base import Storage
from batchgen.store.base import BaseStore


def _stem(path: str) -> str:
    p = PurePosixPath(path)
    return str(p.with_suffix("")) if p.suffix else path


def _aside(store: BaseStore, owner: str, rel_no_ext: str) -> list[tuple[int, str, str]]:
    """(idx, path, path aside) for each image of `owner` saved under `rel_no_ext` with any extension."""
    return [(img.idx, img.path, aside_relpath(img.path, img.sha256, folder=SUPERSEDED_DIR))
            for img in store.images_for(owner) if _stem(img.path) == rel_no_ext]


async def supersede(store: BaseStore, storage: Storage, owner: str, rel_no_ext: str) -> None:
    """Move the images of `owner`, a request no longer in the manifest, off the name `rel_no_ext`."""
    for idx, path, aside in _aside(store, owner, rel_no_ext):
        await asyncio.to_thread(storage.move, path, aside)  # a bucket's copy must not hold up the loop
        store.move_image(owner, idx, aside)


def restore_names(store: BaseStore, storage: Storage) -> int:
    """At the start of a run whose manifest changed: the images of live requests that were moved aside as
    superseded go back to their names (the current holder, no longer in the manifest, moving aside).
    Returns how many came back. Blocks briefly (one rename, or one copy in a bucket, per image): it runs
    before anything is sent."""
    restored = 0
    for img in store.live_images_under(SUPERSEDED_DIR + "/"):
        name = original_relpath(img.path, SUPERSEDED_DIR)
        holder = store.path_owner([name])
        if holder is not None and holder != img.request_key:
            if store.is_live(holder):
                continue  # both are asked for: the holder keeps it (the names of the current manifest decide)
            for idx, path, aside in _aside(store, holder, _stem(name)):
                storage.move(path, aside)
                store.move_image(holder, idx, aside)
        if storage.move(img.path, name) or storage.has_image(name, img.sha256, img.bytes):
            store.move_image(img.request_key, img.idx, name)
            restored += 1
    return restored
