"""The HTML report without a browser: tiles match the export, every untrusted value is escaped (checked by
parsing the page, not by searching strings), thumbnails exist and link to the full images, failures show
their code and message, checks and review states are shown, missing or broken images do not stop the
report, the page stays small, and a report into a pipe or device is the default report's page."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import threading
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from batchgen.cli import main
from batchgen.results.export import export_results
from batchgen.results.render import THUMB_PX, asset, environment, fit, script_json
from batchgen.results.report import REPORT_NAME, write_report
from batchgen.results.sheet import format_duration
from tests.emulator_fixtures import API_KEY
from tests.results_support import FAILED, IMAGES, ITEMS, LS, PS, TILES, Job, build_job

HOSTILE = [
    "<script>alert(1)</script>",
    '" onerror="alert(1)',
    "</script><script>alert(2)</script>",
    "<!-- <script>",
    f"line{LS}separator{PS}paragraph",
    "&lt;already escaped&gt; & more",
    "'single' \"double\"",
]


class Page(HTMLParser):
    """Every tag with its attributes, and the text of each <script>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self._in_script = False
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if tag == "script":
            self.scripts.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts[-1] += data
        else:
            self.text.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Job:
    return build_job(tmp_path_factory.mktemp("job"))


@pytest.fixture(scope="module")
def report(job: Job) -> tuple[Path, int]:
    return write_report(job.db, None)


# --- pure functions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", HOSTILE)
def test_script_json_cannot_end_the_script_and_round_trips(value: str) -> None:
    text = script_json({"prompt": value, "list": [value]})
    assert not re.search("[<>&\u2028\u2029]", text)
    assert json.loads(text) == {"prompt": value, "list": [value]}


@pytest.mark.parametrize("value", HOSTILE)
def test_templates_escape_by_default(value: str) -> None:
    # The same environment the report uses: autoescaping on, so a value needs no filter to stay text.
    text = environment().from_string('<p title="{{ v }}">{{ v }}</p>').render(v=value)
    page = Page()
    page.feed(text)
    assert page.tags == [("p", {"title": value})] and "".join(page.text) == value


def test_thumbnail_sizes_and_durations() -> None:
    assert fit(1024, 512) == (160, 80) and fit(64, 64) == (64, 64) and fit(None, None) == (THUMB_PX, THUMB_PX)
    assert format_duration(5) == "5s" and format_duration(125) == "2m 05s" and format_duration(3725) == "1h 02m 05s"


# --- the report of a finished job ---------------------------------------------------------------------


def test_tiles_match_the_per_image_export(job: Job, report: tuple[Path, int], tmp_path: Path) -> None:
    path, tiles = report
    assert path == job.out_dir.resolve() / REPORT_NAME
    assert tiles == TILES == export_results(job.db, output=tmp_path / "rows.csv")
    page = parse(path)
    tiles = [a for t, a in page.tags if t == "figure" and "tile" in (a.get("class") or "").split()]
    assert len(tiles) == TILES
    assert sum("image" in (a["class"] or "").split() for a in tiles) == IMAGES
    assert sum("error" in (a["class"] or "").split() for a in tiles) == FAILED
    # Dense: only SKU-6 (two styles × two images) and the other items (two styles each) are groups; each
    # group is one item.
    groups = [a for t, a in page.tags if t == "section" and a.get("class") == "group"]
    assert len(groups) == 6


def test_a_tiles_credits_are_its_images_share_as_in_the_export(job: Job, tmp_path: Path) -> None:
    """An n: 2 request's two tiles showed its whole charge each; the export shares it evenly per image."""
    import csv

    from batchgen.results.sheet import gather
    from batchgen.store.open import open_store

    export_results(job.db, output=tmp_path / "rows.csv")
    with (tmp_path / "rows.csv").open(newline="", encoding="utf-8") as fh:
        exported = [float(r["credits"]) for r in csv.DictReader(fh)]
    with open_store(job.db) as store:
        sheet = gather(store, job.out_dir)
    shown = [t.credits for g in sheet.groups for t in g.tiles]
    assert sorted(shown) == pytest.approx(sorted(exported))
    assert sum(shown) == pytest.approx(sum(exported))


def test_hostile_values_stay_text(report: tuple[Path, int]) -> None:
    path, _ = report
    page = parse(path)
    # Only our two scripts exist, and no element got an event-handler attribute from a prompt.
    assert len(page.scripts) == 2
    assert [a.get("type") for t, a in page.tags if t == "script"] == ["application/json", None]
    for tag, attrs in page.tags:
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
    json.loads(page.scripts[0])  # the data block is intact JSON
    text = "".join(page.text)
    for item in ITEMS:
        assert item["name"] in text  # shown to the reader exactly as written
    raw = path.read_text(encoding="utf-8")
    assert "window.__pwned" in raw and "<script>window.__pwned" not in raw
    assert API_KEY not in raw


def test_thumbnails_exist_and_tiles_link_to_the_full_images(report: tuple[Path, int]) -> None:
    path, _ = report
    page = parse(path)
    imgs = [a for t, a in page.tags if t == "img" and a.get("id") != "lb-img"]
    links = [a["href"] for t, a in page.tags if t == "a" and a.get("href")]
    assert len(imgs) == len(links) == IMAGES
    for attrs in imgs:
        assert attrs["loading"] == "lazy" and attrs["src"] and attrs["src"].startswith("thumbs/")
        with Image.open(path.parent / attrs["src"]) as thumb:
            assert thumb.format == "JPEG" and max(thumb.size) <= THUMB_PX
    for href in links:
        assert not href.startswith(("/", "http")) and (path.parent / href).is_file()


def test_failures_show_code_and_message_and_filters_list_what_exists(report: tuple[Path, int]) -> None:
    path, _ = report
    page = parse(path)
    text = "".join(page.text)
    assert "invalid_parameters" in text and "Invalid parameters for this model." in text
    options = [a["value"] for t, a in page.tags if t == "option"]
    assert options == ["", "done", "failed", "", "z-image-turbo", "", "passed", "", "unreviewed"]
    data = json.loads(page.scripts[0])
    assert data["tiles"] == TILES and data["totals"]["failed"] == FAILED and data["totals"]["done"] == 10


def test_a_report_elsewhere_links_back_into_the_output_folder(job: Job, tmp_path: Path) -> None:
    path, tiles = write_report(job.db, tmp_path / "elsewhere" / "r.html")
    assert tiles == TILES
    page = parse(path)
    hrefs = [a["href"] or "" for t, a in page.tags if t == "a"]
    assert all(h.startswith("../") and (path.parent / h).resolve().is_file() for h in hrefs)
    assert len(list((tmp_path / "elsewhere" / "thumbs").glob("*.jpg"))) == IMAGES


def test_missing_and_broken_images_do_not_stop_the_report(job: Job, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(job.out_dir, out)
    (out / "SKU-1" / "plain_1.png").unlink()
    (out / "SKU-2" / "plain_1.png").write_bytes(b"not an image")
    path, tiles = write_report(job.db, tmp_path / "r.html", out_dir=out)
    assert tiles == TILES
    raw = path.read_text(encoding="utf-8")
    assert raw.count("file missing") == 1
    assert len(list((tmp_path / "thumbs").glob("*.jpg"))) == IMAGES - 2


def test_page_size_per_tile_stays_small(report: tuple[Path, int]) -> None:
    path, tiles = report
    page_bytes = path.stat().st_size
    fixed = len(asset("sheet.css")) + len(asset("sheet.js")) + 4000  # CSS, script, header, lightbox
    assert (page_bytes - fixed) / tiles < 1000, page_bytes


# --- a report into a pipe or a device ---------------------------------------------------------------------


def test_a_report_into_a_fifo_is_the_default_reports_page(job: Job, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.html"
    os.mkfifo(fifo)
    got: list[str] = []
    # A daemon: renamed over, the FIFO would never get a writer and its reader would wait forever.
    reader = threading.Thread(target=lambda: got.append(fifo.read_text(encoding="utf-8")), daemon=True)
    reader.start()
    result = CliRunner().invoke(main, ["report", "--db", str(job.db), "-o", str(fifo)])
    reader.join(timeout=10)
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and f"wrote {fifo} ({TILES} tiles)" in result.stderr  # stdout may be the page
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert got and got[0].rstrip().endswith("</html>")
    # A pipe has no folder of its own: the page links to thumbnails and images in the output folder.
    page = Page()
    page.feed(got[0])
    srcs = [a["src"] or "" for t, a in page.tags if t == "img" and a.get("id") != "lb-img"]
    assert len(srcs) == IMAGES and all((job.out_dir / src).is_file() for src in srcs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe.html"]


def test_a_report_into_dev_null_leaves_the_device_and_its_folder_alone(job: Job) -> None:
    thumbs_before = os.path.exists("/dev/thumbs")
    result = CliRunner().invoke(main, ["report", "--db", str(job.db), "-o", os.devnull])
    assert result.exit_code == 0, result.output
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    assert os.path.exists("/dev/thumbs") == thumbs_before  # no thumbnails beside a device
