"""At the start of a run: images a person rejected in `batchgen review` go back to be generated again.

A reviewer's reject is recorded in the store (`reviews`) and nothing else happens until the next
`batchgen run`, which calls `requeue_rejected` after syncing the manifest. Each done request with a current
image rejected (and not yet acted on) has its images moved aside under `_rejected/` (kept, not deleted) and
goes back to `pending` as a new attempt, within `max_attempts`; the credit cap is applied when the
scheduler claims it, like any other submission. A request that has used all its attempts is left as it
is, rejected, and counted, so the run can say so (raise `run.max_attempts` to regenerate it anyway).

The API generates a request's images together, so rejecting one image of a request with n > 1
regenerates all of them.

Order, for a run killed half-way: files are moved first (under names derived from their content, so a
second move is a no-op), then one transaction records the move and requeues the request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from batchgen.storage import aside
from batchgen.storage.base import Storage
from batchgen.store.base import BaseStore as Store
from batchgen.store.records import SetAsideRecord


@dataclass(frozen=True)
class Requeued:
    requeued: int  # requests sent back to pending for a new attempt
    exhausted: int  # rejected requests left as they are: no attempts left


def requeue_rejected(store: Store, storage: Storage, max_attempts: int) -> Requeued:
    requeued = exhausted = 0
    for req, reviews in store.reviews.open_rejects():
        if req.attempts >= max_attempts:
            exhausted += 1
            continue
        why = {rv.idx: rv.reason for rv in reviews}
        asides = []
        for img in req.images:
            rel = aside.aside_relpath(img.path, img.sha256)
            aside.move_aside(storage, img.path, rel)
            reason = why.get(img.idx)
            if img.idx not in why:
                reason = "regenerated with a rejected image of the same request"
            asides.append(SetAsideRecord(req.key, img.idx, img.attempt_id, rel, img.sha256, img.bytes, img.width,
                                         img.height, img.format, "review", reason, time.time()))
        reasons = "; ".join(dict.fromkeys(r for r in why.values() if r))
        store.reviews.requeue_rejected(req.key, asides, "rejected in review" + (f": {reasons}" if reasons else ""))
        requeued += 1
    return Requeued(requeued, exhausted)
