"""Make the screenshot in docs/results.md: a 300-row job on the emulator, reviewed in `batchgen review`.

Not a test (no test_ prefix); run it by hand when the page changes:

    .venv/bin/python -m tests.screenshot_sheet docs/images/review-grid.png

It runs a CSV-like job of 300 items (a few with two images, a few failing, a few returning blank or
wrong-aspect images that `on_fail: keep` flags), records some decisions, serves `batchgen review` and
photographs the top of the grid in headless Chromium.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from batchgen.emulator import Emulator, EmulatorConfig
from batchgen.store.sqlite import Store
from tests.emulator_fixtures import FAST_TIME_SCALE
from tests.run_support import db_of, run, write_job
from tests.test_report_browser import CHROMIUM_ARGS, chromium_executable

COLOURS = ["red", "blue", "green", "black", "white", "yellow", "grey", "orange"]
THINGS = ["mug", "lamp", "chair", "vase", "bowl", "clock", "kettle", "stool", "plate", "jug"]


async def build(root: Path) -> Path:
    rows = []
    for i in range(300):
        colour, thing = COLOURS[i % len(COLOURS)], THINGS[(i // 3) % len(THINGS)]
        row = {"id": f"SKU-{1000 + i}", "prompt": f"studio photo of a {colour} {thing}, plain background",
               "size": ["1:1", "4:5", "3:2"][i % 3], "name": f"{colour} {thing}"}
        if i % 47 == 5:
            row["n"] = 2
        if i % 31 == 7:
            row["prompt"] = "blank " + row["prompt"]
        if i % 53 == 11:
            row["prompt"] = "skewed " + row["prompt"]
        if i % 71 == 13:
            row["prompt"] = "refused " + row["prompt"]
        rows.append(row)
    manifest = write_job(root, rows, name="catalogue")
    data = yaml.safe_load(manifest.read_text())
    data["quality"] = {"on_fail": "keep"}
    manifest.write_text(yaml.safe_dump(data))
    rules = [{"prompt": "^blank ", "fail_with": "blank"}, {"prompt": "^skewed ", "fail_with": "wrong_aspect"},
             {"prompt": "^refused ", "fail_with": "content_policy_violation"}]
    async with Emulator(EmulatorConfig(time_scale=FAST_TIME_SCALE, seed=3, rules=rules)) as emu:
        await run(manifest, emu.base_url)
    with Store(db_of(manifest)) as store:
        for n, req in enumerate(store.iter_requests()):
            for img in req.images:
                if n % 9 == 2:
                    store.reviews.decide(req.key, img.idx, img.sha256, "approve", None)
                elif n % 23 == 4 or img.check_status == "failed":
                    store.reviews.decide(req.key, img.idx, img.sha256, "reject", "not usable")
    return manifest


def main(target: Path) -> None:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        manifest = asyncio.run(build(Path(tmp)))
        server = subprocess.Popen([sys.executable, "-m", "batchgen", "review", str(manifest), "--no-browser"],
                                  stdout=subprocess.PIPE, text=True)
        try:
            line = server.stdout.readline() if server.stdout else ""
            match = re.search(r"(http://\S+)", line)
            assert match, line
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium_executable(), args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1500, "height": 1100})
                page.goto(match.group(1))
                page.wait_for_function("() => Array.from(document.images).filter(i => i.id !== 'lb-img' && "
                                       "i.getBoundingClientRect().top < innerHeight).every(i => i.complete)")
                page.locator("figure.tile").nth(3).hover()
                page.screenshot(path=str(target))
                browser.close()
        finally:
            server.send_signal(signal.SIGTERM)
            server.communicate(timeout=10)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images/review-grid.png"))
