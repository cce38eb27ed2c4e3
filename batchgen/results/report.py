"""`batchgen report`: a contact sheet of a job, to spot the bad images among hundreds at a glance.

One HTML file that needs no network: inline CSS and vanilla JS, totals at the top (requests done and
failed, images, credits, time taken), then one section per item in manifest order and, inside it, one card
per request (its variant) with its thumbnails, prompt, model, cost and status. Failed requests show their
error code and message instead of images. The page filters by status and model and searches items (id
and the item's own fields) without reloading.

Thumbnails are files, not data URIs: `thumbs/<sha256>.jpg` beside the report, 160 px on the long side
(JPEG, ~3–8 KB). With 5,000 images, data URIs would make a ~30 MB HTML file the browser must parse before
showing anything; as files, the HTML stays small (a few hundred bytes per tile plus the prompt) and
`loading="lazy"` fetches only what is on screen. Names are content hashes, so a second report reuses
every thumbnail already made, and two reports in one folder share them. Each thumbnail links to the
full-size image by a relative path (the report and the output folder move together).

Everything that comes from a manifest or the API (prompts, item fields, ids, error messages, model names,
paths) is untrusted: text and attributes go through `html.escape`, URLs are percent-encoded first, and
the JSON embedded in `<script>` escapes `<`, `>`, `&` and U+2028/U+2029 (`script_json`), so a prompt like
`</script><script>...` stays text.

`write_report(db_path, output)` returns the report's path and the number of tiles: one per saved image
plus one per request without images (failed or unfinished) — the same count as the per-image export.
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import os
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from PIL import Image, ImageOps

from batchgen.results.export import input_field_order, ordered, producing_attempt, request_credits
from batchgen.storage.atomicfile import atomic_text
from batchgen.store.base import BaseStore
from batchgen.store.open import open_store
from batchgen.store.records import ImageRecord, RequestRecord

REPORT_NAME = "report.html"
THUMBS_DIR = "thumbs"
THUMB_PX = 160
THUMB_QUALITY = 80


def esc(value: Any) -> str:
    """Text or attribute value, HTML-escaped (quotes included)."""
    return html.escape("" if value is None else str(value), quote=True)


def script_json(value: Any) -> str:
    """JSON safe inside `<script>`: no `</script>`, `<!--`, `&` entity tricks or JS line terminators."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return (text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def href(path: Path, base: Path) -> str:
    """A relative, percent-encoded URL from the report's folder to `path` (`#`, `?`, spaces stay literal)."""
    rel = Path(os.path.relpath(path, base)).as_posix()
    return urllib.parse.quote(rel, safe="/")


def fit(width: int | None, height: int | None, box: int = THUMB_PX) -> tuple[int, int]:
    """Thumbnail size of a `width` x `height` image fitted into `box` (unknown sizes: a square)."""
    if not width or not height:
        return box, box
    scale = min(box / width, box / height, 1.0)
    return max(1, round(width * scale)), max(1, round(height * scale))


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


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
    tmp = dst.with_name(f".{dst.name}.part")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, dst)


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

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def collect_totals(store: BaseStore) -> Totals:
    job = store.job_record() or {}
    counts = store.counts()
    credits = store.credit_totals()
    images, _ = store.image_totals()
    runs = store.runs()
    run_time_s = sum((r["finished_at"] or r["started_at"]) - r["started_at"] for r in runs)
    return Totals(
        job=str(job.get("name") or ""), requests=sum(v for k, v in counts.items() if k != "removed"),
        done=counts["done"], failed=counts["failed"],
        unfinished=counts["pending"] + counts["submitted"] + counts["completed"], images=images,
        credits_used=round(credits.used, 4), credits_reserved=round(credits.reserved, 4), runs=len(runs),
        run_time_s=run_time_s)


class _Renderer:
    """Writes the page while queueing thumbnails on a thread pool (Pillow releases the GIL)."""

    def __init__(self, fh: IO[str], out_dir: Path, report_dir: Path, pool: ThreadPoolExecutor) -> None:
        self.fh = fh
        self.out_dir = out_dir
        self.report_dir = report_dir
        self.thumbs = report_dir / THUMBS_DIR
        self.pool = pool
        self.jobs: list[Future[None]] = []
        self.tiles = 0
        self.statuses: dict[str, int] = {}
        self.models: dict[str, int] = {}
        self.item_order: list[str] = []  # the input's field order (the store keeps them sorted)
        self.variant_order: list[str] = []

    def tile(self, req: RequestRecord, img: ImageRecord) -> str:
        self.tiles += 1
        src = self.out_dir / img.path
        label = " ".join([req.item_id, *req.variant.values(), f"#{img.idx}"])
        if not src.is_file():
            return (f'<figure class="tile missing"><div class="ph">file missing</div>'
                    f"<figcaption>{esc(img.path)}</figcaption></figure>")
        thumb = self.thumbs / f"{img.sha256[:24]}.jpg"  # 96 bits of the content hash: unique enough, short
        self.jobs.append(self.pool.submit(make_thumbnail, src, thumb))
        w, h = fit(img.width, img.height)
        return (f'<figure class="tile"><a href="{esc(href(src, self.report_dir))}" target="_blank">'
                f'<img src="{esc(href(thumb, self.report_dir))}" width="{w}" height="{h}" loading="lazy" '
                f'alt="{esc(label)}"></a></figure>')

    def card(self, req: RequestRecord) -> str:
        attempt = producing_attempt(req, req.images[-1] if req.images else None)
        model = attempt.model if attempt is not None else req.model
        status = req.state.value
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.models[model] = self.models.get(model, 0) + 1
        if req.images:
            body = "".join(self.tile(req, img) for img in req.images)
            tiles = len(req.images)
        else:
            self.tiles += 1
            tiles = 1
            if status == "failed":
                body = (f'<div class="tile error"><b>{esc(req.error_code or "failed")}</b>'
                        f"<span>{esc(req.error_message or '')}</span></div>")
            else:
                body = f'<div class="tile ph">{esc(status)}</div>'
        keys = ordered(req.variant, self.variant_order)
        variant = " · ".join(f"{k}: {req.variant[k]}" for k in keys)
        credits = request_credits(req)
        variant_p = f'<p class="variant">{esc(variant)}</p>' if variant else ""
        return (f'<article class="req {esc(status)}" data-status="{esc(status)}" data-model="{esc(model)}" '
                f'data-tiles="{tiles}"><div class="imgs">{body}</div><div class="cap">{variant_p}'
                f'<p class="prompt">{esc(req.params.get("prompt", ""))}</p>'
                f'<p class="facts"><span class="st">{esc(status)}</span> · {esc(model)} · {credits:g} credits</p>'
                f"</div></article>")

    def section(self, item_id: str, metadata: dict[str, str], cards: list[str]) -> str:
        keys = ordered(metadata, self.item_order)
        fields = " · ".join(f"{k}: {metadata[k]}" for k in keys if metadata[k] != item_id)
        search = " ".join(dict.fromkeys(v.lower() for v in [item_id, *metadata.values()]))
        small = f" <small>{esc(fields)}</small>" if fields else ""
        return (f'<section class="item" data-search="{esc(search)}"><h2>{esc(item_id)}{small}</h2>'
                f'<div class="grid">{"".join(cards)}</div></section>\n')

    def sections(self, requests: Iterator[RequestRecord]) -> None:
        current: tuple[str, dict[str, str]] | None = None
        cards: list[str] = []
        for req in requests:
            if current is not None and req.item_id != current[0]:
                self.fh.write(self.section(*current, cards))
                cards = []
            if current is None or req.item_id != current[0]:
                current = (req.item_id, req.metadata)
            cards.append(self.card(req))
        if current is not None:
            self.fh.write(self.section(*current, cards))


def _header(t: Totals, db_path: Path) -> str:
    credits = f"{t.credits_used:g}" + (f" (+{t.credits_reserved:g} reserved)" if t.credits_reserved else "")
    facts = [("requests", t.requests), ("done", t.done), ("failed", t.failed), ("unfinished", t.unfinished),
             ("images", t.images), ("credits used", credits),
             ("time taken", f"{format_duration(t.run_time_s)} in {t.runs} run(s)")]
    dl = "".join(f'<div class="{esc(k.split()[0])}"><dt>{esc(k)}</dt><dd>{esc(v)}</dd></div>' for k, v in facts)
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime())
    return (f"<header><h1>{esc(t.job or 'batchgen job')}</h1>"
            f'<p class="meta">batchgen report · {esc(when)} · {esc(db_path.name)}</p><dl class="totals">{dl}</dl>')


def _controls(statuses: dict[str, int], models: dict[str, int]) -> str:
    def options(values: dict[str, int]) -> str:
        return "".join(f'<option value="{esc(v)}">{esc(v)} ({n})</option>' for v, n in sorted(values.items()))

    return ('<div class="controls"><label>Status <select id="f-status"><option value="">all</option>'
            f"{options(statuses)}</select></label><label>Model <select id=\"f-model\"><option value=\"\">all"
            f"</option>{options(models)}</select></label><label>Item <input id=\"f-search\" type=\"search\" "
            'placeholder="search id, name, SKU…" autocomplete="off"></label><span id="shown"></span></div></header>')


CSS = """
:root{font:14px/1.4 system-ui,sans-serif;color:#222;background:#f4f4f2}
body{margin:0}header{position:sticky;top:0;z-index:2;background:#fff;border-bottom:1px solid #ddd;padding:10px 16px}
h1{font-size:20px;margin:0}.meta{color:#777;margin:2px 0 8px}
.totals{display:flex;flex-wrap:wrap;gap:6px 22px;margin:0 0 8px}.totals div{display:flex;gap:6px}
.totals dt{color:#666}.totals dd{margin:0;font-weight:600}.failed dd{color:#b00020}.done dd{color:#1b7f3b}
.controls{display:flex;flex-wrap:wrap;gap:14px;align-items:center}.controls select,.controls input{margin-left:4px}
#shown{color:#666}main{padding:8px 16px}[hidden]{display:none!important}
.item{content-visibility:auto;contain-intrinsic-size:auto 320px;margin:10px 0 18px}
.item h2{font-size:15px;margin:0 0 6px}.item h2 small{font-weight:400;color:#777}
.grid{display:flex;flex-wrap:wrap;gap:10px}
.req{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px;width:min-content;min-width:172px}
.req.failed{border-color:#e3a0a8;background:#fff6f7}
.imgs{display:flex;gap:4px;flex-wrap:wrap}.tile{margin:0;width:160px;min-height:90px;display:flex;
align-items:center;justify-content:center;background:#eee;border-radius:3px;overflow:hidden}
.tile img{display:block;max-width:160px;height:auto}
.tile.error{flex-direction:column;align-items:flex-start;justify-content:flex-start;background:#fde8eb;
padding:6px;box-sizing:border-box;color:#800;font-size:12px;overflow-wrap:anywhere}
.ph{color:#888}.cap{font-size:12px;max-width:330px}.cap p{margin:4px 0 0}.variant{font-weight:600}
.prompt{display:-webkit-box;-webkit-line-clamp:3;-webkit-box-orient:vertical;overflow:hidden;cursor:pointer;
color:#444;overflow-wrap:anywhere}.prompt.open{display:block}.facts{color:#666}
.req.failed .st{color:#b00020;font-weight:600}
"""

JS = """
(function () {
  var data = JSON.parse(document.getElementById('report-data').textContent);
  var st = document.getElementById('f-status'), md = document.getElementById('f-model');
  var q = document.getElementById('f-search'), shown = document.getElementById('shown');
  var sections = Array.prototype.slice.call(document.querySelectorAll('section.item'));
  function apply() {
    var s = st.value, m = md.value, t = q.value.trim().toLowerCase(), count = 0;
    sections.forEach(function (sec) {
      var hit = !t || sec.getAttribute('data-search').indexOf(t) >= 0, any = false;
      sec.querySelectorAll('article.req').forEach(function (a) {
        var ok = hit && (!s || a.getAttribute('data-status') === s) && (!m || a.getAttribute('data-model') === m);
        a.hidden = !ok;
        if (ok) { any = true; count += Number(a.getAttribute('data-tiles')); }
      });
      sec.hidden = !any;
    });
    shown.textContent = 'showing ' + count + ' of ' + data.tiles + ' tiles';
  }
  st.addEventListener('change', apply); md.addEventListener('change', apply); q.addEventListener('input', apply);
  document.addEventListener('click', function (e) {
    if (e.target.classList && e.target.classList.contains('prompt')) { e.target.classList.toggle('open'); }
  });
  apply();
})();
"""


def write_report(db_path: Path | str, output: Path | None = None, *, out_dir: Path | None = None,
                 job_name: str | None = None) -> tuple[Path, int]:
    """Write the contact sheet for the job in `db_path`; returns (report path, tiles).

    `output` defaults to report.html in the job's output folder; `out_dir` (where the images are) to the
    output folder the store records for the job."""
    with open_store(db_path, job_name) as store:
        db_path = Path(store.location)  # a URL without its password for a shared store
        job = store.job_record() or {}
        images_dir = Path(out_dir or job.get("output_dir") or db_path.parent).resolve()
        path = Path(output) if output is not None else images_dir / REPORT_NAME
        report_dir = path.resolve().parent
        totals = collect_totals(store)
        with atomic_text(path) as fh, ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2)) as pool:
            (report_dir / THUMBS_DIR).mkdir(parents=True, exist_ok=True)
            # The body is rendered first (into a temporary buffer) because the filters list the statuses
            # and models it found; cards are small, so even 5,000 of them fit comfortably in memory.
            body = io.StringIO()
            renderer = _Renderer(body, images_dir, report_dir, pool)
            renderer.item_order, renderer.variant_order = input_field_order(job.get("manifest_path"))
            renderer.sections(store.iter_requests(with_history=True))
            fh.write('<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
                     '<meta name="viewport" content="width=device-width,initial-scale=1">'
                     f"<title>{esc(totals.job)} · batchgen report</title><style>{CSS}</style></head><body>\n")
            fh.write(_header(totals, db_path))
            fh.write(_controls(renderer.statuses, renderer.models))
            fh.write("\n<main>\n")
            fh.write(body.getvalue())
            if not renderer.tiles:
                fh.write('<p class="ph">This job has no requests yet.</p>')
            data = {"totals": totals.as_dict(), "tiles": renderer.tiles}
            fh.write(f'</main>\n<script type="application/json" id="report-data">{script_json(data)}</script>\n'
                     f"<script>{JS}</script>\n</body></html>\n")
            for job_future in renderer.jobs:
                # An unreadable image gets no thumbnail; its tile still links to the file.
                with contextlib.suppress(OSError):
                    job_future.result()
        return path, renderer.tiles
