"""The review server over real HTTP on 127.0.0.1: it refuses requests without its token, from another
Host or Origin, and non-JSON posts; decisions are stored with time and reason, deciding twice changes
nothing, a decision on a replaced image is refused (409); the next run regenerates exactly the rejected
requests within max_attempts, sets the old images aside and the export and status show the review states;
the static report shows the same states read-only; `batchgen review` binds to 127.0.0.1 only."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from batchgen.results.export import export_results
from batchgen.results.report import write_report
from batchgen.results.review import TOKEN_HEADER, ReviewServer
from batchgen.results.status import collect
from batchgen.store.sqlite import ReviewRefusedError, Store
from tests.emulator_fixtures import API_KEY, EmulatorFactory
from tests.results_support import IMAGES, TILES, Job, build_job
from tests.run_support import check_outputs, db_of, out_of, prompts, run, write_job
from tests.test_report import Page


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Job:
    return build_job(tmp_path_factory.mktemp("job"))


@pytest.fixture
def db(job: Job, tmp_path: Path) -> Path:
    """A copy of the finished job's database per test (decisions change it)."""
    copy = tmp_path / job.db.name
    shutil.copy(job.db, copy)
    return copy


def first_image(db: Path) -> tuple[str, int, str]:
    with Store(db) as store:
        img = next(i for r in store.iter_requests() for i in r.images)
    return img.request_key, img.idx, img.sha256


async def test_token_host_origin_and_json_are_required(db: Path, job: Job) -> None:
    key, idx, sha = first_image(db)
    async with ReviewServer(db, out_dir=job.out_dir) as srv, aiohttp.ClientSession() as http:
        assert srv.url.startswith("http://127.0.0.1:") and f"token={srv.token}" in srv.url
        base = srv.url.split("/?")[0]
        for url in (base + "/", base + "/?token=wrong", f"{base}/image/{key}/{idx}/{sha}",
                    f"{base}/thumb/{key}/{idx}/{sha}.jpg?token={srv.token[:-1]}"):
            async with http.get(url) as r:
                assert r.status == 403, url
        async with http.get(srv.url, headers={"Host": "evil.example"}) as r:
            assert r.status == 403  # DNS rebinding: a foreign name for our address
        async with http.get(srv.url) as r:
            assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
            html = await r.text()
        page = Page()
        page.feed(html)
        buttons = [a for t, a in page.tags if t == "button" and a.get("data-decision")]
        assert len(buttons) == 2 * IMAGES + 2  # two per image tile, two in the lightbox
        assert API_KEY not in html and not any(n.startswith("on") for _, a in page.tags for n in a)
        thumbs = [a["src"] for t, a in page.tags if t == "img" and a.get("src")]
        async with http.get(base + thumbs[0]) as r:
            assert r.status == 200 and r.content_type == "image/jpeg"
        body = {"request_key": key, "idx": idx, "sha256": sha, "decision": "reject", "reason": "logo cut off"}
        post = base + "/api/review"
        async with http.post(post, json=body) as r:
            assert r.status == 403  # no token header
        async with http.post(post, json=body, headers={TOKEN_HEADER: srv.token, "Origin": "http://evil.example"}) as r:
            assert r.status == 403  # cross-site
        async with http.post(post, data="decision=reject", headers={TOKEN_HEADER: srv.token,
                                                                     "Content-Type": "text/plain"}) as r:
            assert r.status == 403  # a form post, not JSON
        with Store(db) as store:
            assert store.reviews.latest() == {}  # nothing refused was recorded
        ok = {TOKEN_HEADER: srv.token, "Origin": base}
        async with http.post(post, json=body, headers=ok) as r:
            first = await r.json()
            assert r.status == 200 and first["review"] == "rejected" and first["reason"] == "logo cut off"
        async with http.post(post, json=body, headers=ok) as r:
            assert r.status == 200 and (await r.json())["decided_at"] == first["decided_at"]  # idempotent
        async with http.post(post, json={**body, "decision": "approve", "reason": ""}, headers=ok) as r:
            assert r.status == 200 and (await r.json())["review"] == "approved"  # a change of mind
        async with http.post(post, json={**body, "sha256": "0" * 64}, headers=ok) as r:
            assert r.status == 409 and "replaced" in (await r.json())["error"]
        async with http.post(post, json={**body, "decision": "maybe"}, headers=ok) as r:
            assert r.status == 400
        async with http.post(post, json={"idx": "x"}, headers=ok) as r:
            assert r.status == 400
    with Store(db) as store:
        rows = store.conn.execute("SELECT decision, reason, decided_at FROM reviews ORDER BY id").fetchall()
    assert [(d, r) for d, r, _ in rows] == [("reject", "logo cut off"), ("approve", None)]
    assert all(t > 0 for _, _, t in rows)


async def test_rejects_are_regenerated_within_max_attempts(tmp_path: Path,
                                                           emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    manifest = write_job(tmp_path, prompts(6), run={"max_attempts": 2})
    assert await run(manifest, emu.base_url) == 0
    db = db_of(manifest)
    with Store(db) as store:
        reqs = list(store.iter_requests())
        old = {r.item_id: r.images[0] for r in reqs}
        store.reviews.decide(old["r0001"].request_key, 1, old["r0001"].sha256, "reject", "wrong colour")
        store.reviews.decide(old["r0003"].request_key, 1, old["r0003"].sha256, "reject", None)
        store.reviews.decide(old["r0003"].request_key, 1, old["r0003"].sha256, "reject", None)  # twice: one decision
        store.reviews.decide(old["r0004"].request_key, 1, old["r0004"].sha256, "approve", None)
    assert collect(db)["review"] == {"approved": 1, "rejected": 2, "unreviewed": 3, "regenerating": 0,
                                     "set_aside": 0, "check_failed": 0}
    assert await run(manifest, emu.base_url) == 0
    check_outputs(manifest)
    with Store(db) as store:
        by_id = {r.item_id: r for r in store.iter_requests()}
        aside = store.reviews.set_aside_images()
        for item in ("r0001", "r0003"):
            with pytest.raises(ReviewRefusedError) as info:
                store.reviews.decide(old[item].request_key, 1, old[item].sha256, "approve", None)
            assert info.value.superseded
    assert {i: len(r.attempt_rows) for i, r in by_id.items()} == {
        "r0000": 1, "r0001": 2, "r0002": 1, "r0003": 2, "r0004": 1, "r0005": 1}
    for item in ("r0001", "r0003"):
        assert by_id[item].state == "done" and by_id[item].images[0].sha256 != old[item].sha256
    assert sorted((a.request_key, a.why, a.reason) for a in aside) == sorted(
        [(old["r0001"].request_key, "review", "wrong colour"), (old["r0003"].request_key, "review", None)])
    assert all((out_of(manifest) / a.path).is_file() and a.path.startswith("_rejected/") for a in aside)
    export_results(db, output=tmp_path / "rows.csv", fmt="jsonl")
    rows = {r["item_id"]: r for r in map(__import__("json").loads, (tmp_path / "rows.csv").read_text().splitlines())}
    assert rows["r0001"]["review"] == "unreviewed" and rows["r0001"]["sha256"] == by_id["r0001"].images[0].sha256
    assert rows["r0004"]["review"] == "approved" and rows["r0000"]["review"] == "unreviewed"
    assert collect(db)["review"]["set_aside"] == 2
    # Rejected again: r0001 has used both of its attempts, so the next run leaves it (and says so).
    with Store(db) as store:
        store.reviews.decide(by_id["r0001"].key, 1, by_id["r0001"].images[0].sha256, "reject", "still wrong")
    assert await run(manifest, emu.base_url) == 0
    with Store(db) as store:
        again = store.get_request(by_id["r0001"].key)
        assert again is not None and len(again.attempt_rows) == 2 and again.state == "done"
    assert collect(db)["review"]["rejected"] == 1


def test_the_report_shows_checks_and_reviews_read_only(db: Path, job: Job, tmp_path: Path) -> None:
    key, idx, sha = first_image(db)
    with Store(db) as store:
        store.reviews.decide(key, idx, sha, "reject", "<b>blurry</b>")
        store.conn.execute("UPDATE images SET check_status='failed', check_reasons='blank: near-uniform' "
                           "WHERE request_key=? AND idx=?", (key, idx))
    path, tiles = write_report(db, tmp_path / "r.html", out_dir=job.out_dir)
    assert tiles == TILES
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    tile = next(a for t, a in page.tags if t == "figure" and a.get("data-key") == key and a.get("data-idx") == "1")
    assert tile["data-review"] == "rejected" and tile["data-check"] == "failed"
    assert not [a for t, a in page.tags if t == "button" and a.get("data-decision")]  # read-only
    assert "review: <b>blurry</b>" in "".join(page.text)  # the reason as text, not markup
    options = [a["value"] for t, a in page.tags if t == "option"]
    assert {"failed", "passed", "rejected", "unreviewed"} <= set(options)


def listening(port: int) -> list[str]:
    """Local addresses listening on `port` (from /proc/net/tcp and tcp6)."""
    found = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(name):
            continue
        for line in Path(name).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.rsplit(":", 1)
            if state == "0A" and int(hexport, 16) == port:
                found.append(addr)
    return found


def test_the_command_prints_a_tokened_url_and_binds_to_loopback_only(db: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "batchgen", "review", "--db", str(db), "--no-browser"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        match = re.search(r"http://127\.0\.0\.1:(\d+)/\?token=([\w-]{20,})", line)
        assert match, line
        assert listening(int(match.group(1))) == ["0100007F"]  # 127.0.0.1, nothing else
    finally:
        proc.send_signal(signal.SIGTERM)
        out: Any = proc.communicate(timeout=10)
    assert proc.returncode == 0, out


async def test_a_busy_port_is_a_message_not_a_traceback(db: Path) -> None:
    import socket

    from batchgen.errors import ConfigError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}.*--port"):
            async with ReviewServer(db, port=port):
                pass
