"""Acceptance for outputs in a bucket: a real `python -m batchgen run --out s3://...` killed with SIGKILL at
random moments never has an image counted done that is not stored (with its checksum) in the bucket, and
re-runs finish the job with every image stored exactly once. Then the catalogue example end to end on the
emulator into a bucket, with `status`, `export` and `report` (in the bucket, and local) on it."""

from __future__ import annotations

import csv
import html.parser
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.emulator_fixtures import API_KEY, EmulatorProcess
from tests.run_support import prompts, write_job
from tests.s3_fixtures import S3Env
from tests.test_run_s3 import check_bucket

TIME_SCALE = 0.02
REPO = Path(__file__).resolve().parent.parent


def batchgen(args: list[str], s3: S3Env, cwd: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **s3.env, "EVOLINK_API_KEY": API_KEY, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "batchgen", *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[bytes], timeout_s: float = 90) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout_s)
    assert b"Traceback" not in err, err.decode()[-3000:]
    return proc.returncode, out.decode(), err.decode()


def stored_when_done(manifest: Path, s3: S3Env, prefix: str) -> int:
    """Every image the store records (and so every request counted done) is in the bucket with its bytes."""
    import sqlite3

    client = s3.client()
    conn = sqlite3.connect(manifest.parent / f"{manifest.stem}.batchgen.db")
    rows = conn.execute("SELECT path, bytes, sha256 FROM images").fetchall()
    conn.close()
    for path, size, sha in rows:
        head = client.head_object(Bucket=s3.bucket, Key=f"{prefix}/{path}", ChecksumMode="ENABLED")
        assert head["ContentLength"] == size and head["Metadata"]["sha256"] == sha, path
    return len(rows)


def wait_for_images(manifest: Path, count: int, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    import sqlite3

    db = manifest.parent / f"{manifest.stem}.batchgen.db"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if db.exists():
            conn = sqlite3.connect(db, timeout=5)
            try:
                if conn.execute("SELECT COUNT(*) FROM images").fetchone()[0] >= count:
                    return
            except sqlite3.OperationalError:
                pass  # not migrated yet
            finally:
                conn.close()
        time.sleep(0.05)


def test_sigkill_mid_job_then_resume_into_a_bucket(tmp_path: Path, s3: S3Env,
                                                   emulator_process: Callable[..., EmulatorProcess]) -> None:
    emu = emulator_process(time_scale=TIME_SCALE)
    rows = prompts(80) + [{"id": f"m{i}", "prompt": f"pair {i}", "n": 2} for i in range(10)]
    manifest = write_job(tmp_path, rows, run={"rate": "15/s", "concurrency": 30})
    args = ["run", str(manifest), "--api-base", emu.base_url, "--files-base", emu.base_url, "--time-scale",
            str(TIME_SCALE), "--json", "--out", s3.url("killed")]
    rng = random.Random(11)
    kills = 0
    recorded = [0]
    for _ in range(3):
        proc = batchgen(args, s3, tmp_path)
        # Killed in the middle of storing: once a few more images are recorded, after a random extra moment
        # (a fixed sleep would depend on how loaded the machine is).
        wait_for_images(manifest, recorded[-1] + rng.randint(3, 12), proc)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=10)
        recorded.append(stored_when_done(manifest, s3, "killed"))
    assert kills >= 2 and 0 < recorded[-1] < 100, recorded
    codes = [finish(batchgen(args, s3, tmp_path))[0]]
    while codes[-1] == 3 and len(codes) < 4:
        codes.append(finish(batchgen(args, s3, tmp_path))[0])
    assert codes[-1] == 0, codes
    assert check_bucket(manifest, s3, "killed") == {"done": 90}
    assert stored_when_done(manifest, s3, "killed") == 80 + 20


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.srcs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "a" and a.get("href"):
            self.hrefs.append(a["href"] or "")
        if tag == "img" and a.get("src"):
            self.srcs.append(a["src"] or "")


def links(text: str) -> _Links:
    parser = _Links()
    parser.feed(text)
    return parser


@pytest.mark.slow
def test_catalogue_example_into_a_bucket_then_status_export_report(tmp_path: Path, s3: S3Env) -> None:
    for name in ("catalogue.yaml", "products.csv"):
        shutil.copy(REPO / "examples" / name, tmp_path / name)
    manifest = tmp_path / "catalogue.yaml"
    code, out, err = finish(batchgen(["run", str(manifest), "--emulator", "--time-scale", "0.01", "--rate", "100/s",
                                      "--json", "--out", s3.url("shop/catalogue")], s3, tmp_path))
    assert code == 0, err[-2000:]
    assert check_bucket(manifest, s3, "shop/catalogue") == {"done": 72}
    keys = s3.object_keys("shop/catalogue/")
    assert "shop/catalogue/results.csv" in keys and "shop/catalogue/index.jsonl" in keys
    assert any(k.startswith("shop/catalogue/kitchen/") for k in keys)  # the template's sub-folders as keys

    code, out, _ = finish(batchgen(["status", str(manifest), "--json"], s3, tmp_path))
    status = json.loads(out)
    assert code == 0 and status["done"] == 72 and status["output_dir"] == s3.url("shop/catalogue")

    code, _, _ = finish(batchgen(["export", str(manifest), "-o", "images.csv"], s3, tmp_path))
    with (tmp_path / "images.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert code == 0 and len(rows) == 72 and all(f"shop/catalogue/{r['path']}" in keys for r in rows)

    # The report in the bucket (the default): relative keys to the images and to thumbnails beside it.
    code, out, _ = finish(batchgen(["report", str(manifest)], s3, tmp_path))
    assert code == 0 and f"{s3.url('shop/catalogue')}/report.html" in out
    client = s3.client()
    page = client.get_object(Bucket=s3.bucket, Key="shop/catalogue/report.html")["Body"].read().decode()
    found = links(page)
    assert len(found.hrefs) == 72 and len(found.srcs) == 72
    keys = set(s3.object_keys("shop/catalogue/"))
    assert all(not h.startswith(("http", "/")) and f"shop/catalogue/{h}" in keys for h in found.hrefs)
    assert all(s.startswith("thumbs/") and f"shop/catalogue/{s}" in keys for s in found.srcs)

    # A local report: thumbnails as local files, links presigned for a stated lifetime, and they work.
    code, out, _ = finish(batchgen(["report", str(manifest), "-o", "local/report.html"], s3, tmp_path))
    assert code == 0 and "presigned" in out and "7 days" in out
    found = links((tmp_path / "local" / "report.html").read_text())
    assert all((tmp_path / "local" / s).is_file() for s in found.srcs) and len(found.srcs) == 72
    assert all(h.startswith(s3.endpoint) and "X-Amz-Expires=604800" in h for h in found.hrefs)
    with urllib.request.urlopen(found.hrefs[0]) as answer:  # 127.0.0.1 (moto)
        assert answer.status == 200 and answer.read()[:8] == b"\x89PNG\r\n\x1a\n"
    for text in (page, (tmp_path / "local" / "report.html").read_text(), out):
        assert s3.secret not in text
