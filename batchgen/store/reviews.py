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
from collections.abc import Sequence

from batchgen.store.records import RequestRecord, ReviewRecord, SetAsideRecord


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
