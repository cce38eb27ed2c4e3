"""The reviews ledger (issue 16): images set aside, people's decisions on images, and rejected requests requeued.

An image leaves the results in two ways: it fails the automatic checks when it is downloaded
(engine/quality.py, engine/downloads.py), or a person rejects it in `batchgen review` (results/review.py) and
the next `batchgen run` regenerates its request (engine/rejects.py). Either way the file is kept under
`_rejected/` (storage/aside.py) and recorded here, so nothing a run paid for is lost and a reviewer's reason
stays next to the image it was about. Status, the report and the review page read the decisions and the
counts back.

`ReviewLedger` is the interface; each backend has one implementation (sqlite_reviews.py,
postgres_reviews.py) that its store holds as `store.reviews`. It is a ledger of its own so that the store
class does not carry this concern among its many others. The writes that send a request back (a failed
check, a requeued reject) stay one transaction with that request's new state: the implementations call
their store's own requeue and fail helpers rather than keeping a second copy of them.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from batchgen.models import State
from batchgen.store.records import RequestRecord, ReviewRecord, ReviewRefusedError, SetAsideRecord

DECISIONS = ("approve", "reject")

# The rules of a decision, the same on every backend (each reads the rows its own way).


def checked_reason(decision: str, reason: str | None) -> str | None:
    """The reason to record with `decision` (trimmed; empty is None); ReviewRefusedError for a decision
    that is neither approve nor reject."""
    if decision not in DECISIONS:
        raise ReviewRefusedError(f'decision must be "approve" or "reject", not "{decision}"')
    return (reason or "").strip() or None


def current_image(image: Sequence[Any] | None, sha256: str) -> Sequence[Any]:
    """`image` is (sha256, attempt id, request state) of the image now at that place, or None; returned when
    a decision may be taken on it. A decision is only taken on the image a person saw, while its request is
    done: otherwise ReviewRefusedError (the page is stale)."""
    if image is None or image[0] != sha256:
        raise ReviewRefusedError("this image has been replaced by a newer one (regenerated); reload the "
                                 "page to review the current image", superseded=True)
    if image[2] != State.DONE.value:
        raise ReviewRefusedError(f"this request is {image[2]}: it is being generated again; reload the page "
                                 "once the run has finished", superseded=True)
    return image


def same_again(last: Sequence[Any], decision: str, reason: str | None) -> bool:
    """Whether the latest decision row (as ReviewRecord's fields) already says this: nothing to record. A
    reject already acted on is about an earlier image with the same bytes: a new decision is recorded."""
    if last[7] is not None and last[4] == "reject":
        return False
    return bool(last[4] == decision and (reason is None or last[5] == reason))


def by_request(rows: Iterable[Sequence[Any]],
               get_request: Callable[[str], RequestRecord | None]) -> list[tuple[RequestRecord, list[ReviewRecord]]]:
    """Decision rows (ReviewRecord's fields, in order) grouped by request, with the request."""
    groups: dict[str, list[ReviewRecord]] = {}
    for row in rows:
        groups.setdefault(row[0], []).append(ReviewRecord(*row))
    out = []
    for key, reviews in groups.items():
        req = get_request(key)
        if req is not None:
            out.append((req, reviews))
    return out


def latest_by_image(rows: Iterable[Sequence[Any]]) -> dict[tuple[str, int, str], ReviewRecord]:
    """Decision rows (ReviewRecord's fields) by the image they are about: (request key, idx, sha256).

    A reject a run has acted on (`acted_at`) is left out: its image left the results and the request was
    generated again, so an image there now with the same bytes is a new one, not yet reviewed."""
    return {(r[0], r[1], r[2]): ReviewRecord(*r) for r in rows if r[7] is None or r[4] != "reject"}


def count_images(images: Iterable[Sequence[Any]], latest: dict[tuple[str, int, str], ReviewRecord]) -> dict[str, int]:
    """The images (request key, idx, sha256) of the results by review state."""
    out = {"approved": 0, "rejected": 0, "unreviewed": 0}
    for key, idx, sha in images:
        rv = latest.get((key, idx, sha))
        out["approved" if rv and rv.decision == "approve" else "rejected" if rv else "unreviewed"] += 1
    return out


class ReviewLedger(abc.ABC):
    """Images kept aside, decisions on images, and the requeue of rejected requests, for one job's store."""

    @abc.abstractmethod
    def reject_image(self, aside: SetAsideRecord, *, requeue: bool, code: str, message: str) -> None:
        """An image failed its checks and was kept aside: record it, and requeue (a new attempt) or fail."""

    @abc.abstractmethod
    def set_aside_images(self) -> list[SetAsideRecord]: ...

    @abc.abstractmethod
    def latest(self) -> dict[tuple[str, int, str], ReviewRecord]:
        """The latest decision on every image that has one, by (request key, idx, sha256)."""

    @abc.abstractmethod
    def decide(self, request_key: str, idx: int, sha256: str, decision: str, reason: str | None) -> ReviewRecord:
        """A person's decision on one image; ReviewRefusedError when the image is no longer current."""

    @abc.abstractmethod
    def open_rejects(self) -> list[tuple[RequestRecord, list[ReviewRecord]]]:
        """Done requests with a rejected current image not yet acted on: what the next run regenerates."""

    @abc.abstractmethod
    def requeue_rejected(self, request_key: str, asides: Sequence[SetAsideRecord], reason: str) -> None:
        """The rejected images leave the results (kept aside), and the request is pending again."""

    @abc.abstractmethod
    def counts(self) -> dict[str, int]: ...
