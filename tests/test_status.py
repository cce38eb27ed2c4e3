"""`batchgen status`: counts by state, credits, images and failures grouped by code, as JSON and text."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from batchgen.cli import main
from batchgen.results.status import collect, render_text
from batchgen.store.sqlite import ImageRecord, NewAttempt, Outcome, Store
from tests.test_store import FakeManifest, keys_of


def build(tmp_path: Path) -> Path:
    path = tmp_path / "s.db"
    m = FakeManifest(tmp_path, ["a", "b", "c", "d"])
    with Store(path) as store:
        store.sync(m)
        ka, kb, kc, _ = keys_of(m)
        ids = store.start_attempts([NewAttempt(k, 1, "z-image-turbo", 0.5) for k in (ka, kb, kc)])
        for i, task in zip(ids, ("task-unified-1-a", "task-unified-1-b", "task-unified-1-c"), strict=True):
            store.record_task(i, task, 0.5, replayed=False)
        store.record_outcomes([
            Outcome(ids[0], ka, "completed", result_urls=("http://x/1.png",), credits_used=0.5),
            Outcome(ids[1], kb, "failed", error_code="content_policy_violation", error_message="refused"),
        ])
        store.record_image(ImageRecord(ka, 1, "a_1.png", "http://x/1.png", 2048, "00", 8, 8, "PNG", ids[0], 0.0),
                           done=True)
    return path


def test_collect_counts_credits_images_and_failures(tmp_path: Path) -> None:
    s = collect(build(tmp_path))
    assert {k: s[k] for k in ("total", "pending", "in_flight", "done", "failed", "images")} == {
        "total": 4, "pending": 1, "in_flight": 1, "done": 1, "failed": 1, "images": 1}
    assert s["credits"] == {"reserved": 0.5, "used": 0.5, "spent": 1.0, "estimated_remaining": 0.5}
    assert s["failures"] == [{"code": "content_policy_violation", "count": 1,
                              "messages": [{"message": "refused", "count": 1}], "other_messages": 0}]
    text = render_text(s)
    assert "1/4 done" in text and "content_policy_violation: 1" in text and "refused" in text


def test_failures_past_the_messages_shown_are_counted_not_dropped(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    m = FakeManifest(tmp_path, [f"r{i}" for i in range(6)])
    with Store(path) as store:
        store.sync(m)
        keys = keys_of(m)
        ids = store.start_attempts([NewAttempt(k, 1, "z-image-turbo", 0.5) for k in keys])
        store.record_outcomes([Outcome(i, k, "failed", error_code="quality_check_failed",
                                       error_message=f"blank image, set aside as _rejected/{k}.png")
                               for i, k in zip(ids, keys, strict=True)])
    s = collect(path)
    (group,) = s["failures"]
    assert group["count"] == 6 and len(group["messages"]) == 3 and group["other_messages"] == 3
    assert "3 more with other messages" in render_text(s)


def test_status_command_json(tmp_path: Path) -> None:
    db = build(tmp_path)
    result = CliRunner().invoke(main, ["status", "--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert {"total", "pending", "in_flight", "done", "failed", "credits", "images"} <= set(data)
    missing = CliRunner().invoke(main, ["status", "--db", str(tmp_path / "nope.db")])
    assert missing.exit_code == 2
