"""Rendering the contact sheet with Jinja2: one template (`templates/sheet.html.j2`) for the static
report and the review page, with autoescaping always on.

Everything on the page that comes from a manifest or the API (prompts, item fields, ids, error messages,
model names, paths) is untrusted. With autoescaping, every `{{ value }}` is HTML-escaped (quotes included)
unless a template says otherwise, so escaping is the default rather than a rule to remember; URLs are
percent-encoded by the callers' link functions before they are escaped; the JSON in the page's data block
goes through `script_json`, which also escapes `<`, `>`, `&` and U+2028/U+2029, so a prompt like
`</script><script>...` stays text. The CSS and JS are static files read as they are (never templated).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from importlib import resources
from typing import Any

import jinja2
from markupsafe import Markup

from batchgen.results.sheet import Sheet, Tile, facts, generated_at

THUMB_PX = 160


def script_json(value: Any) -> Markup:
    """JSON safe inside `<script>`: no `</script>`, `<!--`, `&` entity tricks or JS line terminators."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return Markup(text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
                  .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def fit(width: int | None, height: int | None, box: int = THUMB_PX) -> tuple[int, int]:
    """Thumbnail size of a `width` x `height` image fitted into `box` (unknown sizes: a square)."""
    if not width or not height:
        return box, box
    scale = min(box / width, box / height, 1.0)
    return max(1, round(width * scale)), max(1, round(height * scale))


@lru_cache(maxsize=8)
def asset(name: str) -> Markup:
    """A static file from templates/ (CSS, JS), inlined as it is: the page must work offline."""
    return Markup(resources.files("batchgen.results").joinpath("templates", name).read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("batchgen.results", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["script_json"] = script_json
    env.globals.update(asset=asset, fit=fit)
    return env


def render_sheet(sheet: Sheet, *, mode: str, db_name: str, thumb_url: Callable[[Tile], str],
                 full_url: Callable[[Tile], str], data: dict[str, Any] | None = None) -> str:
    """The page. `mode` is "report" (static, read-only) or "review" (decisions posted to the server)."""
    payload = {"totals": sheet.totals.as_dict(), "tiles": sheet.tiles, "mode": mode, **(data or {})}
    return environment().get_template("sheet.html.j2").render(
        sheet=sheet, mode=mode, review=mode == "review", db_name=db_name, when=generated_at(),
        facts=facts(sheet.totals), thumb_url=thumb_url, full_url=full_url, data=payload)
