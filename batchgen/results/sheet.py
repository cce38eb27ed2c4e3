"""The contact sheet's data: what the report and the review page show, gathered from the store.

Kept apart from rendering (report.py writes files, review.py serves the same page over HTTP, both through
the Jinja2 templates in `templates/`) so that how images are found and linked can change without touching
the markup. One `Tile` per saved image plus one per request without images (failed or unfinished) — the
same count as the per-image export. Consecutive requests of one item form a `Group`; the page draws a
group as a box only when it has several tiles, so a CSV job with one image per row is one dense grid.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchgen.results.export import Reviews, image_credits, input_field_order, ordered, producing_attempt
from batchgen.storage.base import Storage
from batchgen.storage.local import LocalStorage
from batchgen.store.base import BaseStore as Store
from batchgen.store.records import ImageRecord, RequestRecord
from batchgen.units import credits_text, plural

REVIEW_LABELS = {"approve": "approved", "reject": "rejected"}


@dataclass(frozen=True)
class Totals:
    job: str
    requests: int
    done: int
    failed: int
    unfinished: int
    images: int
    credits_used: float
    credits_reserved: float
    runs: int
    run_time_s: float
    check_failed: int = 0
    approved: int = 0
    rejected: int = 0
    set_aside: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Tile:
    kind: str  # image, missing (recorded but not on disk), error (failed request), waiting (not finished)
    request_key: str
    idx: int  # the image's number in its request; 0 for a tile without an image
    sha256: str
    item_id: str
    caption: str  # item id, variant values, image number
    prompt: str
    variant: str  # "style: bold · size: 16:9"
    model: str
    status: str
    credits: float
    search: str  # lower-cased item id and fields, for the page's search box
    path: Path | None = None  # the image file (absolute), when the images are in a local folder
    rel: str = ""  # the image's name relative to the output folder or bucket prefix
    width: int | None = None
    height: int | None = None
    error_code: str = ""
    error_message: str = ""
    check: str = ""  # passed, failed, not_checked ("" without an image)
    check_reasons: str = ""
    review: str = ""  # approved, rejected, unreviewed ("" without an image)
    review_reason: str = ""


@dataclass
class Group:
    item_id: str
    fields: str  # the item's own fields, "name: blue mug · colour: blue"
    tiles: list[Tile] = field(default_factory=list)


@dataclass
class Sheet:
    totals: Totals
    groups: list[Group]
    tiles: int
    facets: dict[str, dict[str, int]]  # filter name (status, model, check, review) -> value -> tiles


def collect_totals(store: Store) -> Totals:
    job = store.job_record() or {}
    counts = store.counts()
    credits = store.credit_totals()
    images, _ = store.image_totals()
    runs = store.run_log.all()
    review = store.reviews.counts()
    run_time_s = sum((r["finished_at"] or r["started_at"]) - r["started_at"] for r in runs)
    return Totals(
        job=str(job.get("name") or ""), requests=sum(v for k, v in counts.items() if k != "removed"),
        done=counts["done"], failed=counts["failed"],
        unfinished=counts["pending"] + counts["submitted"] + counts["completed"], images=images,
        credits_used=round(credits.used, 4), credits_reserved=round(credits.reserved, 4), runs=len(runs),
        run_time_s=run_time_s, check_failed=review["check_failed"], approved=review["approved"],
        rejected=review["rejected"], set_aside=review["set_aside"])


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


def facts(t: Totals) -> list[tuple[str, str, str]]:
    """The header's figures: (label, value, css class)."""
    credits = credits_text(t.credits_used) + (
        f" (+{credits_text(t.credits_reserved)} reserved)" if t.credits_reserved else "")
    out = [("requests", str(t.requests), "requests"), ("done", str(t.done), "done"),
           ("failed", str(t.failed), "failed"), ("unfinished", str(t.unfinished), "unfinished"),
           ("images", str(t.images), "images"), ("credits used", credits, "credits"),
           ("time taken", f"{format_duration(t.run_time_s)} in {plural(t.runs, 'run')}", "time")]
    if t.check_failed or t.set_aside:
        out.append(("check failures", f"{t.check_failed} flagged, {t.set_aside} set aside", "checks"))
    if t.approved or t.rejected:
        out.append(("reviewed", f"{t.approved} approved, {t.rejected} rejected", "reviewed"))
    return out


class _Gatherer:
    def __init__(self, store: Store, images: Path | Storage) -> None:
        # A folder is checked file by file; an image in a bucket is trusted to the store's record (a HEAD
        # per tile would cost as much as the thumbnails).
        self.images_dir = images.root if isinstance(images, LocalStorage) else (
            None if isinstance(images, Storage) else images)
        self.reviews: Reviews = store.reviews.latest()
        job = store.job_record() or {}
        self.item_order, self.variant_order = input_field_order(job.get("manifest_path"))
        self.facets: dict[str, dict[str, int]] = {"status": {}, "model": {}, "check": {}, "review": {}}
        self.count = 0

    def _count(self, tile: Tile) -> None:
        self.count += 1
        for name in ("status", "model", "check", "review"):
            value = getattr(tile, name)
            if value:
                self.facets[name][value] = self.facets[name].get(value, 0) + 1

    def tiles(self, req: RequestRecord) -> Iterator[Tile]:
        attempt = producing_attempt(req, req.images[-1] if req.images else None)
        model = attempt.model if attempt is not None else req.model
        keys = ordered(req.variant, self.variant_order)
        common: dict[str, Any] = {
            "request_key": req.key, "item_id": req.item_id, "prompt": str(req.params.get("prompt", "")),
            "variant": " · ".join(f"{k}: {req.variant[k]}" for k in keys), "model": model,
            "status": req.state.value, "credits": image_credits(req),  # as the export's per-image column
            "search": " ".join(dict.fromkeys(v.lower() for v in [req.item_id, *req.metadata.values()])),
        }
        base = " ".join([req.item_id, *(req.variant[k] for k in keys)])
        if not req.images:
            kind = "error" if req.state.value == "failed" else "waiting"
            yield Tile(kind=kind, idx=0, sha256="", caption=base, error_code=req.error_code or "",
                       error_message=req.error_message or "", **common)
            return
        for img in req.images:
            yield self.image_tile(img, base, common)

    def image_tile(self, img: ImageRecord, base: str, common: dict[str, Any]) -> Tile:
        src = self.images_dir / img.path if self.images_dir is not None else None
        rv = self.reviews.get((img.request_key, img.idx, img.sha256))
        return Tile(kind="image" if src is None or src.is_file() else "missing", idx=img.idx, sha256=img.sha256,
                    caption=f"{base} #{img.idx}", path=src, rel=img.path, width=img.width, height=img.height,
                    check=img.check_status or "not_checked", check_reasons=img.check_reasons or "",
                    review=REVIEW_LABELS[rv.decision] if rv else "unreviewed",
                    review_reason=(rv.reason or "") if rv else "", **common)

    def groups(self, requests: Iterator[RequestRecord]) -> list[Group]:
        out: list[Group] = []
        for req in requests:
            if not out or out[-1].item_id != req.item_id:
                keys = ordered(req.metadata, self.item_order)
                fields = " · ".join(f"{k}: {req.metadata[k]}" for k in keys if req.metadata[k] != req.item_id)
                out.append(Group(req.item_id, fields))
            for tile in self.tiles(req):
                self._count(tile)
                out[-1].tiles.append(tile)
        return out


def gather(store: Store, images_dir: Path | Storage) -> Sheet:
    """Everything the page shows, in manifest order. Tiles are small; 5,000 of them fit easily in memory.
    `images_dir` is the output folder, or the job's `Storage` (a folder or a bucket)."""
    g = _Gatherer(store, images_dir)
    groups = g.groups(store.iter_requests(with_history=True))
    return Sheet(totals=collect_totals(store), groups=groups, tiles=g.count, facets=g.facets)


def generated_at() -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime())
