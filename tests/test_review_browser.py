"""Acceptance (issue 16, human review) in real headless Chromium (Playwright, Debian's chromium): open
`batchgen review`, reject three tiles by clicking and one with the keyboard, reload and see the
decisions kept; the next `batchgen run` regenerates exactly those four and nothing else; the export shows
the new images and the review states; hostile prompts and fields run no script. Everything runs as real
processes: the emulator, both runs, the review server."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from batchgen.store.sqlite import Store
from tests.emulator_fixtures import API_KEY, FAST_TIME_SCALE, EmulatorProcess
from tests.run_support import db_of, prompts, write_job
from tests.test_report_browser import CHROMIUM_ARGS, chromium_executable

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

if chromium_executable() is None and os.environ.get("CI"):
    pytest.fail("CI must run the review browser test: no chromium executable (apt-get install chromium)",
                pytrace=False)
pytestmark = pytest.mark.skipif(chromium_executable() is None,
                                reason="no chromium executable: apt-get install chromium")

CLICKED = (1, 4, 6)  # tiles rejected with the mouse (manifest order)
KEYED = 9  # and one with the keyboard


def batchgen(*args: str, base_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EVOLINK_API_KEY": API_KEY, "EVOLINK_API_BASE": base_url, "EVOLINK_FILES_BASE": base_url}
    return subprocess.run([sys.executable, "-m", "batchgen", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def rows_of(manifest: Path, base_url: str) -> dict[str, dict[str, Any]]:
    done = batchgen("export", str(manifest), "--format", "jsonl", base_url=base_url)
    assert done.returncode == 0, done.stderr
    return {r["item_id"]: r for r in map(json.loads, done.stdout.splitlines())}


def test_reject_by_click_and_key_then_the_next_run_regenerates_exactly_those(
        tmp_path: Path, emulator_process: Any) -> None:
    emu: EmulatorProcess = emulator_process()
    rows = prompts(12)
    rows[2]["prompt"] = "<script>window.__pwned=1</script> mug"
    for i, row in enumerate(rows):
        row["name"] = ['" onerror="window.__pwned=2" x="', "</script><img src=x onerror=alert(1)>"][i % 2]
    manifest = write_job(tmp_path, rows, run={"max_attempts": 2})
    scale = str(FAST_TIME_SCALE)
    first = batchgen("run", str(manifest), "--time-scale", scale, base_url=emu.base_url)
    assert first.returncode == 0, first.stderr
    before = rows_of(manifest, emu.base_url)
    ids = [f"r{i:04d}" for i in range(12)]
    rejected = {ids[i] for i in (*CLICKED, KEYED)}

    server = subprocess.Popen([sys.executable, "-m", "batchgen", "review", str(manifest), "--no-browser"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline() if server.stdout else ""
        match = re.search(r"(http://127\.0\.0\.1:\d+/\?token=[\w-]+)", line)
        assert match, line
        url = match.group(1)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_executable(), args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            dialogs: list[str] = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(url)
            page.wait_for_function("() => Array.from(document.images).filter(i => i.id !== 'lb-img')"
                                   ".every(i => i.complete && i.naturalWidth > 0)")
            assert page.locator("section.group").count() == 0  # one image per row: one dense grid
            tiles = page.locator("figure.tile")
            assert tiles.count() == 12
            page.fill("#f-reason", "too dark")
            for i in CLICKED:
                tiles.nth(i).hover()
                tiles.nth(i).locator("button.reject").click()
                page.wait_for_function(f"() => document.querySelectorAll('figure.tile')[{i}].dataset.review"
                                       " === 'rejected'")
            page.fill("#f-reason", "")
            page.locator("figure.tile").nth(CLICKED[-1]).focus()
            for _ in range(KEYED - CLICKED[-1]):
                page.keyboard.press("ArrowRight")
            assert page.evaluate("() => document.activeElement.dataset.idx") == "1"
            page.keyboard.press("r")
            page.wait_for_function(f"() => document.querySelectorAll('figure.tile')[{KEYED}].dataset.review"
                                   " === 'rejected'")
            page.reload()
            states = page.evaluate("() => Array.from(document.querySelectorAll('figure.tile'))"
                                   ".map(t => t.dataset.review)")
            assert [i for i, s in enumerate(states) if s == "rejected"] == sorted((*CLICKED, KEYED))
            assert set(states) == {"rejected", "unreviewed"}
            page.select_option("#f-review", "rejected")
            assert page.inner_text("#shown") == "showing 4 of 12 tiles"
            assert page.evaluate("() => window.__pwned") is None and dialogs == []
            assert page.inner_text("#notice") == ""
            browser.close()
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=10)
    with Store(db_of(manifest)) as store:
        reasons = {r.item_id: [v.reason for v in store.reviews.latest().values() if v.request_key == r.key]
                   for r in store.iter_requests()}
    assert {i for i, r in reasons.items() if r} == rejected
    assert reasons[ids[1]] == ["too dark"] and reasons[ids[KEYED]] == [None]

    second = batchgen("run", str(manifest), "--time-scale", scale, "--json", base_url=emu.base_url)
    assert second.returncode == 0, second.stderr
    events = [json.loads(x) for x in second.stdout.splitlines() if x.startswith("{")]
    assert {e["key"] for e in events if e["event"] == "submitted"} == {before[i]["request_key"] for i in rejected}
    assert emu.stats()["tasks_created"] == 16
    after = rows_of(manifest, emu.base_url)
    for item in ids:
        if item in rejected:
            assert after[item]["sha256"] != before[item]["sha256"] and after[item]["review"] == "unreviewed"
            assert (manifest.parent / "out" / "job" / after[item]["path"]).is_file()
        else:
            assert after[item]["sha256"] == before[item]["sha256"] and after[item]["review"] == "unreviewed"
    with Store(db_of(manifest)) as store:
        aside = store.reviews.set_aside_images()
    assert sorted(a.request_key for a in aside) == sorted(before[i]["request_key"] for i in rejected)
    assert all(a.why == "review" and (manifest.parent / "out" / "job" / a.path).is_file() for a in aside)
