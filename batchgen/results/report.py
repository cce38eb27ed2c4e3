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

The page is rendered from Jinja2 templates with autoescaping (render.py says how untrusted values stay
text); the data comes from sheet.py. `write_report(db_path, output)` returns the report's path and the
number of tiles: one per saved image plus one per request without images (failed or unfinished) — the
same count as the per-image export.
"""

from __future__ import annotations

import contextlib
import io
import os
import urllib.parse
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageOps

from batchgen.results.render import THUMB_PX, render_sheet
from batchgen.results.sheet import Tile, gather
from batchgen.storage.atomicfile import atomic_text
from batchgen.store.sqlite import Store

REPORT_NAME = "report.html"
THUMBS_DIR = "thumbs"
THUMB_QUALITY = 80


def href(path: Path, base: Path) -> str:
    """A relative, percent-encoded URL from the report's folder to `path` (`#`, `?`, spaces stay literal)."""
    rel = Path(os.path.relpath(path, base)).as_posix()
    return urllib.parse.quote(rel, safe="/")


def thumb_name(sha256: str) -> str:
    return f"{sha256[:24]}.jpg"  # 96 bits of the content hash: unique enough, short


def make_thumbnail(src: Path, dst: Path, box: int = THUMB_PX) -> None:
    """Write a JPEG thumbnail of `src` to `dst` (skipped when it exists: names are content hashes)."""
    if dst.exists():
        return
    with Image.open(src) as source:
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
    # A cache, not a result: renamed into place (never half-written) but not fsynced; delete thumbs/ to rebuild.
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.part")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, dst)


def write_report(db_path: Path, output: Path | None = None, *, out_dir: Path | None = None) -> tuple[Path, int]:
    """Write the contact sheet for the job in `db_path`; returns (report path, tiles).

    `output` defaults to report.html in the job's output folder; `out_dir` (where the images are) to the
    output folder the store records for the job."""
    db_path = Path(db_path)
    with Store(db_path) as store:
        job = store.job_record() or {}
        images_dir = Path(out_dir or job.get("output_dir") or db_path.parent).resolve()
        path = Path(output) if output is not None else images_dir / REPORT_NAME
        report_dir = path.resolve().parent
        thumbs = report_dir / THUMBS_DIR
        sheet = gather(store, images_dir)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2)) as pool:
        thumbs.mkdir(parents=True, exist_ok=True)
        jobs: list[Future[None]] = []
        for group in sheet.groups:
            for tile in group.tiles:
                if tile.kind == "image" and tile.path is not None:
                    jobs.append(pool.submit(make_thumbnail, tile.path, thumbs / thumb_name(tile.sha256)))

        def thumb_url(t: Tile) -> str:
            return href(thumbs / thumb_name(t.sha256), report_dir)

        def full_url(t: Tile) -> str:
            assert t.path is not None
            return href(t.path, report_dir)

        page = render_sheet(sheet, mode="report", db_name=db_path.name, thumb_url=thumb_url, full_url=full_url)
        with atomic_text(path) as fh:
            fh.write(page)
        for job_future in jobs:
            # An unreadable image gets no thumbnail; its tile still links to the file.
            with contextlib.suppress(OSError):
                job_future.result()
    return path, sheet.tiles
