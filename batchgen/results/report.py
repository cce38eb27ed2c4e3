"""`batchgen report`: a contact sheet of a job, to spot the bad images among hundreds at a glance.

One HTML file that needs no network: inline CSS and vanilla JS, totals at the top (requests done and
failed, images, credits, time taken, check failures and review decisions), then one dense grid of tiles
in manifest order — an item with several images (a matrix, or n > 1) is boxed as a group, an item with one
image is just its tile. Each tile shows its thumbnail, the item and variant, and badges for a failed
automatic check and a person's decision; failed requests show their error code and message instead. The
page filters by status, model, check result and review state, searches items (id and the item's own
fields), moves between tiles with the arrow keys, and opens a tile in a lightbox (Enter, or a click). It
is read-only: decisions are made in `batchgen review`, which serves the same page (review.py).

Thumbnails are files, not data URIs: `thumbs/<sha256>.jpg` beside the report, 160 px on the long side
(JPEG, ~3–8 KB). With 5,000 images, data URIs would make a ~30 MB HTML file the browser must parse before
showing anything; as files, the HTML stays small (a few hundred bytes per tile plus the prompt) and
`loading="lazy"` fetches only what is on screen. Names are content hashes, so a second report reuses
every thumbnail already made, and two reports in one folder share them. Each thumbnail links to the
full-size image by a relative path (the report and the output folder move together).

Where the images are in a bucket (`s3://...`, docs/storage.md), `ImageLinks` — the report's data layer for
images — gives each tile its two hrefs: relative keys when the report sits in the same bucket (it is
written there by default, thumbnails under `thumbs/` beside it), and presigned GET URLs valid for
`LINK_LIFETIME_S` (7 days, SigV4's limit) when the report is written to a local file; thumbnails are then
local files beside it, so the page still shows them after the links expire. Thumbnails already made are
found with one listing, so a second report fetches only the images it has not seen.

The page is rendered from Jinja2 templates with autoescaping (render.py says how untrusted values stay
text); the data comes from sheet.py. `write_report(db_path, output)` returns the report's path and the
number of tiles: one per saved image plus one per request without images (failed or unfinished) — the
same count as the per-image export.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import urllib.parse
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from batchgen.errors import ConfigError
from batchgen.results.render import THUMB_PX, render_sheet
from batchgen.results.sheet import Tile, gather
from batchgen.storage.atomicfile import is_special, open_output
from batchgen.storage.base import Storage
from batchgen.storage.local import LocalStorage
from batchgen.storage.location import STORAGE_META, is_bucket_url, open_storage, storage_for_job
from batchgen.store.open import open_store

REPORT_NAME = "report.html"
THUMBS_DIR = "thumbs"
THUMB_QUALITY = 80
LINK_LIFETIME_S = 7 * 24 * 3600  # presigned links from a local report to a bucket's images (SigV4's maximum)


def href(path: Path, base: Path) -> str:
    """A relative, percent-encoded URL from the report's folder to `path` (`#`, `?`, spaces stay literal)."""
    rel = Path(os.path.relpath(path, base)).as_posix()
    return urllib.parse.quote(rel, safe="/")


def thumb_name(sha256: str) -> str:
    return f"{sha256[:24]}.jpg"  # 96 bits of the content hash: unique enough, short


def thumbnail_jpeg(data: bytes, box: int = THUMB_PX) -> bytes:
    """A JPEG thumbnail of the image `data`, fitted into `box` (transparency on white)."""
    with Image.open(io.BytesIO(data)) as source:
        source.draft("RGB", (box, box))  # JPEG sources decode at a reduced scale: much faster
        img: Image.Image = ImageOps.exif_transpose(source)
        img.thumbnail((box, box))
        if img.mode in ("RGBA", "LA", "P"):
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (255, 255, 255))
            img.paste(rgba, mask=rgba.getchannel("A"))
        elif img.mode != "RGB":
            img = img.convert("RGB")
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=THUMB_QUALITY, optimize=True)
    return buf.getvalue()


def make_thumbnail(src: Path, dst: Path, box: int = THUMB_PX) -> None:
    """Write a JPEG thumbnail of `src` to `dst` (skipped when it exists: names are content hashes)."""
    if dst.exists():
        return
    data = thumbnail_jpeg(src.read_bytes(), box)
    # A cache, not a result: renamed into place (never half-written) but not fsynced; delete thumbs/ to rebuild.
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.part")
    tmp.write_bytes(data)
    os.replace(tmp, dst)


@dataclass(frozen=True)
class TileLinks:
    """What a tile needs of its image: where the full-size image and its thumbnail are, for the browser."""

    href: str
    thumb_href: str


class ImageLinks:
    """The report's data layer for images: each image's thumbnail (made once, on a thread pool, from the
    image's bytes wherever they are stored) and the two hrefs, relative or presigned (module docstring).

    `images` holds the job's outputs; `report` is the folder or prefix the report sits in (its `thumbs/`
    go there too). Thumbnails already present are found with one listing."""

    def __init__(self, images: Storage, report: Storage, pool: ThreadPoolExecutor) -> None:
        if is_bucket_url(report.location) and not is_bucket_url(images.location):
            raise ConfigError("a report in a bucket needs the job's images in a bucket; write it to a local file")
        self.images = images
        self.report = report
        self.pool = pool
        self.jobs: list[Future[None]] = []
        self.existing = report.names_under(THUMBS_DIR)
        self.relative = self._same_bucket() or not is_bucket_url(images.location)
        self._links: dict[str, TileLinks] = {}

    def _same_bucket(self) -> bool:
        return (is_bucket_url(self.images.location) and is_bucket_url(self.report.location)
                and _bucket_key(self.images.location)[0] == _bucket_key(self.report.location)[0])

    def _href(self, storage: Storage, rel: str) -> str:
        """A relative, percent-encoded URL from the report to `rel` in `storage`."""
        if isinstance(storage, LocalStorage) and isinstance(self.report, LocalStorage):
            return href(storage.path(rel), self.report.root)
        _, key = _bucket_key(storage.describe(rel))
        _, base = _bucket_key(self.report.location)
        return urllib.parse.quote(posixpath.relpath(key, base or "."), safe="/")

    def tile_links(self, rel: str, sha256: str) -> TileLinks:
        """The hrefs of the image `rel`, queueing its thumbnail if it is not made yet (once per image)."""
        known = self._links.get(rel)
        if known is not None:
            return known
        name = thumb_name(sha256)
        thumb_rel = posixpath.join(THUMBS_DIR, name)
        if name not in self.existing:
            self.existing.add(name)
            self.jobs.append(self.pool.submit(self._make_thumbnail, rel, thumb_rel))
        full = self._href(self.images, rel) if self.relative else self.images.link(rel, LINK_LIFETIME_S)
        links = self._links[rel] = TileLinks(href=full, thumb_href=self._href(self.report, thumb_rel))
        return links

    def _make_thumbnail(self, rel: str, thumb_rel: str) -> None:
        data = self.images.read_bytes(rel)
        if data is not None:
            self.report.put_bytes(thumb_rel, thumbnail_jpeg(data), "image/jpeg")

    def wait(self) -> None:
        for job_future in self.jobs:
            # An unreadable image gets no thumbnail; its tile still links to the file.
            with contextlib.suppress(OSError, ValueError):
                job_future.result()


def _bucket_key(url: str) -> tuple[str, str]:
    """`s3://bucket/a/b` → ("bucket", "a/b")."""
    bucket, _, key = url[len("s3://"):].partition("/")
    return bucket, key


def links_are_presigned(db_path: Path | str, output: Path | str | None, job_name: str | None = None) -> bool:
    """Whether a report written to `output` links the job's images by presigned URLs (they expire after
    LINK_LIFETIME_S): the images are in a bucket and the report is not in that bucket."""
    with open_store(db_path, job_name) as store:
        location = str((store.job_record() or {}).get("output_dir") or "")
    if not is_bucket_url(location) or output is None or is_special(str(output)):
        return False  # a pipe or device gets the default report's page (write_report)
    return not (is_bucket_url(str(output)) and _bucket_key(str(output))[0] == _bucket_key(location)[0])


def write_report(db_path: Path | str, output: Path | str | None = None, *, out_dir: Path | None = None,
                 job_name: str | None = None) -> tuple[Path | str, int]:
    """Write the contact sheet for the job in `db_path`; returns (report path or s3:// URL, tiles).

    `output` defaults to report.html in the job's output folder or bucket, and may be an
    `s3://bucket/prefix/name.html` URL; `out_dir` (where the images are) defaults to the output location
    the store records for the job."""
    with open_store(db_path, job_name) as store, contextlib.ExitStack() as stack:
        db_name = Path(str(store.location)).name  # a shared store's URL carries no password here
        images = stack.enter_context(storage_for_job(store, str(Path(out_dir).resolve()) if out_dir else None))
        page_to: Path | None = None  # a local file named by the user, written by open_output
        if output is None:
            report, name = images, REPORT_NAME
            shown: Path | str = images.path(REPORT_NAME) if isinstance(images, LocalStorage) else \
                images.describe(REPORT_NAME)
        elif is_bucket_url(str(output)):
            folder, _, name = str(output).rstrip("/").rpartition("/")
            settings = json.loads(store.get_meta(STORAGE_META) or "{}")
            report = stack.enter_context(open_storage(folder, endpoint_url=settings.get("endpoint_url"),
                                                      region=settings.get("region")))
            shown = report.describe(name)
        else:
            page_to = shown = Path(output)
            # A pipe or a device (/dev/stdout) has no folder to hold thumbnails: its page links as the default
            # report's does, to thumbnails in the output folder or bucket. realpath: a link loop is reported
            # by open_output, not raised here.
            report = images if is_special(page_to) else LocalStorage(Path(os.path.realpath(page_to)).parent)
        sheet = gather(store, images)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2)) as pool:
            links = ImageLinks(images, report, pool)

            def thumb_url(t: Tile) -> str:
                return links.tile_links(t.rel, t.sha256).thumb_href

            def full_url(t: Tile) -> str:
                return links.tile_links(t.rel, t.sha256).href

            page = render_sheet(sheet, mode="report", db_name=db_name, thumb_url=thumb_url,
                                full_url=full_url)
            with (open_output(page_to, what="cannot write the report") if page_to is not None
                  else report.open_text(name)) as fh:
                fh.write(page)
            links.wait()
    return shown, sheet.tiles
