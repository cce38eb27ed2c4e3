"""The report in a real browser (the system's headless Chromium, driven by Playwright): thumbnails load,
the status and model filters and the item search show exactly the matching tiles, the arrow keys move
between tiles and Enter opens the lightbox, and hostile prompts run no script. Skipped with the reason
when no Chromium executable is installed (`.ci/run` installs it)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchgen.results.report import write_report
from tests.results_support import FAILED, IMAGES, TILES, Job, build_job

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def chromium_executable() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


pytestmark = pytest.mark.skipif(chromium_executable() is None,
                                reason="no chromium executable: apt-get install chromium")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    job: Job = build_job(tmp_path_factory.mktemp("job"))
    path, tiles = write_report(job.db, None)
    assert tiles == TILES
    return path


@pytest.fixture(scope="module")
def browser(report: Path) -> Iterator[Any]:
    # After `report`: the job runs in asyncio.run, which cannot start once Playwright's loop is running.
    executable = chromium_executable()
    if executable is None:
        pytest.skip("no chromium executable: apt-get install chromium")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, report: Path) -> Iterator[Any]:
    # Tall enough that every card of the small job is on screen, so every lazy thumbnail loads.
    context = browser.new_context(viewport={"width": 1280, "height": 2400}, offline=True)
    pg = context.new_page()
    pg.dialogs = []
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
    pg.goto(report.as_uri())
    yield pg
    context.close()


VISIBLE_IMAGES = """() => Array.from(document.images).filter(i => {
  const r = i.getBoundingClientRect();
  return r.width > 0 && r.bottom > 0 && r.top < window.innerHeight;
})"""


def visible_cards(page: Any) -> list[dict[str, str]]:
    """The tiles on show (one per image, or per request without images), with their item."""
    return page.evaluate("""() => Array.from(document.querySelectorAll('figure.tile'))
        .filter(a => a.getClientRects().length > 0)
        .map(a => ({status: a.dataset.status, model: a.dataset.model, key: a.dataset.key,
                    item: a.closest('section').querySelector('h2').firstChild.textContent.trim()}))""")


def visible_requests(page: Any) -> list[dict[str, str]]:
    seen: dict[str, dict[str, str]] = {}
    for card in visible_cards(page):
        seen.setdefault(card["key"], card)
    return list(seen.values())


def test_thumbnails_load_and_no_hostile_script_runs(page: Any) -> None:
    page.wait_for_function(f"() => ({VISIBLE_IMAGES})().length > 0 && ({VISIBLE_IMAGES})().every(i => i.complete)")
    widths = page.evaluate(f"() => ({VISIBLE_IMAGES})().map(i => i.naturalWidth)")
    assert len(widths) == IMAGES and all(w > 0 for w in widths), widths
    assert page.evaluate("() => window.__pwned") is None
    assert page.dialogs == []
    assert page.inner_text("#shown") == f"showing {TILES} of {TILES} tiles"


def test_status_filter(page: Any) -> None:
    page.select_option("#f-status", "failed")
    cards = visible_requests(page)
    assert len(cards) == FAILED and {c["status"] for c in cards} == {"failed"}
    assert {c["item"] for c in cards} == {"SKU-5"}
    assert page.is_visible("text=invalid_parameters")
    assert page.inner_text("#shown") == f"showing {FAILED} of {TILES} tiles"
    page.select_option("#f-status", "done")
    assert {c["status"] for c in visible_requests(page)} == {"done"} and len(visible_requests(page)) == 10
    page.select_option("#f-status", "")
    assert len(visible_requests(page)) == 12


def test_model_filter_combines_with_status(page: Any) -> None:
    page.select_option("#f-model", "z-image-turbo")
    assert len(visible_requests(page)) == 12
    page.select_option("#f-status", "failed")
    assert len(visible_requests(page)) == FAILED
    page.select_option("#f-model", "")
    page.select_option("#f-status", "")
    assert len(visible_requests(page)) == 12


def test_search_by_item_id_and_fields(page: Any) -> None:
    page.fill("#f-search", "sku-6")
    cards = visible_requests(page)
    assert {c["item"] for c in cards} == {"SKU-6"} and len(cards) == 2
    assert page.inner_text("#shown") == f"showing 4 of {TILES} tiles"  # two requests of two images
    page.fill("#f-search", "HYPERLINK")  # a field of the item, not its id
    assert {c["item"] for c in visible_requests(page)} == {"SKU-3"}
    page.fill("#f-search", "no such item")
    assert visible_requests(page) == []
    assert page.is_hidden("section.group")
    page.fill("#f-search", "")
    assert len(visible_requests(page)) == 12


def test_arrow_keys_move_between_tiles_and_enter_opens_the_lightbox(page: Any) -> None:
    first = page.evaluate("() => document.activeElement.dataset.key")
    assert first  # the first tile has the focus on load
    page.keyboard.press("ArrowRight")
    second = page.evaluate("() => [document.activeElement.dataset.key, document.activeElement.dataset.idx]")
    assert second[0] and second != [first, "1"]
    page.keyboard.press("ArrowLeft")
    assert page.evaluate("() => document.activeElement.dataset.key") == first
    page.keyboard.press("Enter")
    assert page.is_visible("#lightbox") and page.get_attribute("#lb-img", "src")
    assert "in plain style" in page.inner_text("#lb-cap") or "in bold style" in page.inner_text("#lb-cap")
    page.keyboard.press("Escape")
    assert page.is_hidden("#lightbox")
    assert page.evaluate("() => window.__pwned") is None
