"""A finished job with hostile input, for the export and report tests (built once per test module).

Six catalogue items in two styles (12 requests) on the in-process emulator: item names that are HTML,
script and spreadsheet-formula payloads (they end up in prompts, metadata and the report), one item with
n=2, and one item whose prompts the emulator refuses (two failed requests). The run itself writes
`results.csv` and `index.jsonl` to the output folder, as every run does.
"""

from __future__ import annotations

import asyncio
import csv
from dataclasses import dataclass
from pathlib import Path

import yaml

from batchgen.emulator import Emulator, EmulatorConfig
from batchgen.engine.runner import run_job_async
from tests.emulator_fixtures import FAST_TIME_SCALE, SEED
from tests.run_support import options

LS, PS = "\u2028", "\u2029"
ITEMS: list[dict[str, str]] = [
    {"sku": "SKU-1", "name": "<script>window.__pwned=1</script> mug", "colour": "red", "n": ""},
    {"sku": "SKU-2", "name": '" onerror="window.__pwned=2" x="', "colour": "@SUM(1+1)", "n": ""},
    {"sku": "SKU-3", "name": '=HYPERLINK("http://evil.example","click")', "colour": "-5", "n": ""},
    {"sku": "SKU-4", "name": f"</script><script>window.__pwned=3</script>{LS}line{PS}sep", "colour": "+1",
     "n": ""},
    {"sku": "SKU-5", "name": "broken lamp", "colour": "grey", "n": ""},
    {"sku": "SKU-6", "name": "blue mug", "colour": "blue", "n": "2"},
]
STYLES = ["plain", "bold"]
REQUESTS = len(ITEMS) * len(STYLES)  # 12
FAILED = 2  # SKU-5 in both styles
IMAGES = 4 * 2 + 2 * 2  # SKU-1..4 one image each, SKU-6 two each
TILES = IMAGES + FAILED


@dataclass(frozen=True)
class Job:
    manifest: Path
    db: Path
    out_dir: Path
    exit_code: int


def write_manifest(root: Path) -> Path:
    with (root / "items.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["sku", "name", "colour", "n"])
        writer.writeheader()
        writer.writerows(ITEMS)
    manifest = {
        "name": "hostile", "items_csv": "items.csv", "id_field": "sku",
        "defaults": {"model": "z-image-turbo"},
        "prompt": "{name} in {style} style",
        "matrix": {"style": STYLES},
        "output": {"filename": "{sku}/{style}_{index}"},
        "run": {"rate": "200/s", "concurrency": 50, "max_attempts": 1},
    }
    path = root / "hostile.yaml"
    path.write_text(yaml.safe_dump(manifest, allow_unicode=True), encoding="utf-8")
    return path


def build_job(root: Path) -> Job:
    """Write the manifest under `root` and run it to the end on a fresh emulator."""
    manifest = write_manifest(root)

    async def run() -> int:
        config = EmulatorConfig(time_scale=FAST_TIME_SCALE, seed=SEED,
                                rules=[{"prompt": "^broken", "fail_with": "invalid_parameters"}])
        async with Emulator(config) as emu:
            return await run_job_async(manifest, options(emu.base_url))

    code = asyncio.run(run())
    return Job(manifest=manifest, db=root / "hostile.batchgen.db", out_dir=root / "out" / "hostile", exit_code=code)
