"""Helpers for the run engine's tests: write a manifest, run it against an emulator, check the results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from batchgen.engine.runner import run_job_async
from batchgen.models import RunOptions, State
from batchgen.store.open import open_store
from tests.emulator_fixtures import API_KEY, FAST_TIME_SCALE

MODEL = "z-image-turbo"  # fast emulated latency
# Set by the `store_backend` fixture (tests/pg_fixtures.py) while a test runs on PostgreSQL: runs then use
# this database, and db_of() names it.
DB_URL: str | None = None


def write_job(tmp: Path, rows: list[dict[str, Any]], run: dict[str, Any] | None = None,
              name: str = "job", filename: str = "{id}_{index}") -> Path:
    """A YAML job over a CSV of items (columns id, prompt, and any request parameters)."""
    cols: list[str] = []
    for row in rows:
        cols += [c for c in row if c not in cols]
    csv_path = tmp / f"{name}.csv"
    lines = [",".join(cols)] + [",".join(_cell(row.get(c, "")) for c in cols) for row in rows]
    csv_path.write_text("\n".join(lines) + "\n")
    manifest = {"name": name, "defaults": {"model": MODEL}, "items_csv": csv_path.name, "id_field": "id",
                "output": {"filename": filename},
                "run": {"rate": "200/s", "concurrency": 50, **(run or {})}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def _cell(value: Any) -> str:
    text = str(value)
    return '"' + text.replace('"', '""') + '"' if ("," in text or '"' in text) else text


def prompts(count: int, prefix: str = "a small red house number") -> list[dict[str, Any]]:
    return [{"id": f"r{i:04d}", "prompt": f"{prefix} {i}"} for i in range(count)]


def options(base_url: str, **kw: Any) -> RunOptions:
    if DB_URL is not None and "db_path" not in kw:
        kw.setdefault("db_url", DB_URL)
    return RunOptions(api_base=base_url, files_base=base_url, api_key=API_KEY, json_events=True,
                      time_scale=kw.pop("time_scale", FAST_TIME_SCALE), **kw)


async def run(manifest: Path, base_url: str, **kw: Any) -> int:
    return await run_job_async(manifest, options(base_url, **kw))


def db_of(manifest: Path) -> Any:
    """The job's store: the SQLite file beside the manifest, or the PostgreSQL URL of the test."""
    return DB_URL if DB_URL is not None else manifest.parent / f"{manifest.stem}.batchgen.db"


def out_of(manifest: Path) -> Path:
    return manifest.parent / "out" / manifest.stem


def image_files(out_dir: Path) -> list[Path]:
    # Images set aside under _rejected/ (failed checks, rejected in review) are kept but are not results.
    return sorted(p for p in out_dir.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and p.suffix in (".png", ".jpg", ".webp", ".gif")
                  and p.relative_to(out_dir).parts[0] != "_rejected")


def check_outputs(manifest: Path, db: Path | None = None, out: Path | None = None) -> dict[str, Any]:
    """Every done request has all its images on disk exactly once, each recorded with its hash."""
    out_dir = out or out_of(manifest)
    with open_store(db or db_of(manifest)) as store:
        recorded = []
        states: dict[str, int] = {}
        # Every request's images, those of requests no longer in the manifest too: their files stay on disk.
        for rec in store.iter_requests(states=[s.value for s in State]):
            if rec.state != "removed":
                states[rec.state.value] = states.get(rec.state.value, 0) + 1
            if rec.state == "done":
                last = [a for a in rec.attempt_rows if a.state == "completed"][-1]
                assert len(rec.images) == len(last.result_urls) >= 1, rec.key
            recorded += [img.path for img in rec.images]
        files = [str(p.relative_to(out_dir)) for p in image_files(out_dir)]
        assert sorted(files) == sorted(recorded), "files on disk differ from the images recorded"
        assert len(set(recorded)) == len(recorded)
        return {"states": states, "images": len(recorded), "counts": store.counts()}


def json_events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]
