"""Runs whose outputs go straight to a bucket (moto on 127.0.0.1, the emulator for the API): every image
stored and verified before it is done, a resumed run does not rewrite what is stored, throttling never
fails a request, templates cannot leave the prefix, and no credential reaches the store or the files."""

from __future__ import annotations

import base64
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from batchgen.errors import ManifestError
from batchgen.models import State
from batchgen.results.provenance import find
from batchgen.results.status import collect
from batchgen.storage.location import storage_for_job
from batchgen.store.sqlite import Store
from tests.emulator_fixtures import EmulatorFactory
from tests.run_support import db_of, prompts, run, write_job
from tests.s3_fixtures import S3Env, ThrottlingProxy


def with_output(manifest: Path, **output: str) -> Path:
    doc = yaml.safe_load(manifest.read_text())
    doc["output"].update(output)
    manifest.write_text(yaml.safe_dump(doc))
    return manifest


def check_bucket(manifest: Path, s3: S3Env, prefix: str) -> dict[str, int]:
    """Every image the store records is an object under the prefix with that content; nothing else is."""
    client = s3.client()
    with Store(db_of(manifest)) as store:
        states: dict[str, int] = {}
        recorded = {}
        # Every request's images, those no longer in the manifest too (their objects stay); states of live ones.
        for rec in store.iter_requests(states=[s.value for s in State]):
            if store.is_live(rec.key):
                states[rec.state.value] = states.get(rec.state.value, 0) + 1
            for img in rec.images:
                recorded[f"{prefix}/{img.path}"] = img
    objects = [k for k in s3.object_keys(prefix + "/") if k.endswith(".png")]
    assert sorted(objects) == sorted(recorded), "objects in the bucket differ from the images recorded"
    for key, img in recorded.items():
        head = client.head_object(Bucket=s3.bucket, Key=key, ChecksumMode="ENABLED")
        assert head["ContentLength"] == img.bytes
        assert head["ChecksumSHA256"] == base64.b64encode(bytes.fromhex(img.sha256)).decode()
    return states


async def test_a_job_writes_to_the_bucket_and_records_where(tmp_path: Path, emulator_factory: EmulatorFactory,
                                                            s3: S3Env, capsys: pytest.CaptureFixture[str]) -> None:
    emu = await emulator_factory()
    rows = prompts(12) + [{"id": f"pair{i}", "prompt": f"two of them {i}", "n": 2} for i in range(3)]
    manifest = write_job(tmp_path, rows, filename="{id}/img_{index}")
    assert await run(manifest, emu.base_url, out_dir=s3.url("jobs/one")) == 0
    assert check_bucket(manifest, s3, "jobs/one") == {"done": 15}
    assert "jobs/one/results.csv" in s3.object_keys() and "jobs/one/index.jsonl" in s3.object_keys()
    status = collect(db_of(manifest))
    assert status["output_dir"] == s3.url("jobs/one") and status["done"] == 15
    with Store(db_of(manifest)) as store, storage_for_job(store) as storage:
        record = find(storage, "pair1/img_2.png")
        assert record is not None and record["item_id"] == "pair1"
    assert not list(tmp_path.glob("out/**/*.png"))  # nothing went to a local folder
    from batchgen.errors import ConfigError
    from batchgen.results.review import ReviewServer

    with pytest.raises(ConfigError, match="local folder"):  # review serves local folders only (docs/storage.md)
        async with ReviewServer(db_of(manifest)):
            pass
    # The secret never reaches the database, the run's output or the files in the bucket.
    out = capsys.readouterr()
    assert s3.secret not in out.out + out.err
    assert s3.secret.encode() not in db_of(manifest).read_bytes()
    client = s3.client()
    for key in ("jobs/one/results.csv", "jobs/one/index.jsonl"):
        assert s3.secret.encode() not in client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()


async def test_an_edited_row_takes_its_name_in_the_bucket_and_a_returning_row_takes_it_back(
        tmp_path: Path, emulator_factory: EmulatorFactory, s3: S3Env) -> None:
    """engine/names.py on a bucket: the replaced object moves under _superseded/ and back, nothing sent."""
    emu = await emulator_factory()
    manifest = write_job(tmp_path, [{"id": "a", "prompt": "a red chair"}])
    url = s3.url("jobs/edit")
    assert await run(manifest, emu.base_url, out_dir=url) == 0
    write_job(tmp_path, [{"id": "a", "prompt": "a blue chair"}])
    assert await run(manifest, emu.base_url, out_dir=url) == 0
    keys = sorted(k for k in s3.object_keys("jobs/edit/") if k.endswith(".png"))
    assert len(keys) == 2 and keys[0].startswith("jobs/edit/_superseded/a_1.") and keys[1] == "jobs/edit/a_1.png"
    check_bucket(manifest, s3, "jobs/edit")
    tasks = len(emu.tasks())
    write_job(tmp_path, [{"id": "a", "prompt": "a red chair"}])
    assert await run(manifest, emu.base_url, out_dir=url) == 0
    assert len(emu.tasks()) == tasks
    assert check_bucket(manifest, s3, "jobs/edit") == {"done": 1}
    with Store(db_of(manifest)) as store:
        [live] = list(store.iter_requests())
        assert [img.path for img in live.images] == ["a_1.png"]


async def test_resume_checks_stored_objects_and_rewrites_only_wrong_ones(
        tmp_path: Path, emulator_factory: EmulatorFactory, s3: S3Env,
        s3_proxy: Callable[..., ThrottlingProxy]) -> None:
    emu = await emulator_factory()
    proxy = s3_proxy()
    manifest = with_output(write_job(tmp_path, [{"id": "a", "prompt": "four apples", "n": 4}, *prompts(3)]),
                           endpoint_url=proxy.url)  # the manifest's endpoint wins over AWS_ENDPOINT_URL
    assert await run(manifest, emu.base_url, out_dir=s3.url("r")) == 0
    with Store(db_of(manifest)) as store:
        key = next(r.key for r in store.iter_requests() if r.item_id == "a")
        images = store.images_for(key)
    assert len(images) == 4
    # As if the run had been killed after storing the images but before marking the request done, and
    # one stored object had since been overwritten with other bytes.
    conn = sqlite3.connect(db_of(manifest))
    with conn:
        conn.execute("UPDATE requests SET state='completed' WHERE key=?", (key,))
    conn.close()
    s3.client().put_object(Bucket=s3.bucket, Key=f"r/{images[1].path}", Body=b"not the image")
    before = len(proxy.log)
    assert await run(manifest, emu.base_url, out_dir=s3.url("r")) == 0
    second = proxy.log[before:]
    image_puts = [p for m, p, _ in second if m == "PUT" and p.endswith(".png")]
    heads = [p for m, p, _ in second if m == "HEAD" and p.endswith(".png")]
    assert image_puts == [f"/{s3.bucket}/r/{images[1].path}"]  # only the wrong one is written again
    assert sorted(heads) == sorted(f"/{s3.bucket}/r/{img.path}" for img in images)
    assert check_bucket(manifest, s3, "r") == {"done": 4}


async def test_throttling_from_the_store_never_fails_a_request(
        tmp_path: Path, emulator_factory: EmulatorFactory, s3: S3Env,
        s3_proxy: Callable[..., ThrottlingProxy]) -> None:
    emu = await emulator_factory()
    seen: dict[str, int] = {}

    def throttle(method: str, path: str, n: int) -> bool:  # every image: SlowDown twice, then through
        if method != "PUT" or not path.endswith(".png"):
            return False
        seen[path] = seen.get(path, 0) + 1
        return seen[path] <= 2

    proxy = s3_proxy(throttle)
    manifest = with_output(write_job(tmp_path, prompts(20)), endpoint_url=proxy.url)
    assert await run(manifest, emu.base_url, out_dir=s3.url("slow")) == 0
    assert len(proxy.requests("PUT", 503)) == 2 * 20
    assert check_bucket(manifest, s3, "slow") == {"done": 20}


async def test_a_template_that_tries_to_leave_the_prefix_is_refused(
        tmp_path: Path, emulator_factory: EmulatorFactory, s3: S3Env) -> None:
    emu = await emulator_factory()
    manifest = write_job(tmp_path, prompts(2), filename="../../{id}_{index}")
    with pytest.raises(ManifestError) as caught:
        await run(manifest, emu.base_url, out_dir=s3.url("jobs/p"))
    assert "output.filename" in str(caught.value)
    # An item value cannot climb out either: "/" and ".." in values are neutralised into the name.
    manifest = write_job(tmp_path, [{"id": "x", "dir": "../../etc", "prompt": "escape"}],
                         filename="{dir}/{id}_{index}", name="values")
    assert await run(manifest, emu.base_url, out_dir=s3.url("jobs/p")) == 0
    keys = [k for k in s3.object_keys() if k.endswith(".png")]
    assert len(keys) == 1 and keys[0].startswith("jobs/p/") and ".." not in keys[0].split("/"), keys
    assert emu.stats()["tasks_created"] == 1


def test_bad_bucket_urls_are_input_errors(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from batchgen.cli import main

    manifest = write_job(tmp_path, prompts(1))
    result = CliRunner().invoke(main, ["run", str(manifest), "--emulator", "--out", "s3://Not_A_Bucket/x"])
    assert result.exit_code == 2 and "bucket name" in result.output and "Traceback" not in result.output
    with_output(manifest, folder="s3://ok-bucket/../up")
    result = CliRunner().invoke(main, ["validate", str(manifest)])
    assert result.exit_code == 2 and "output.folder" in result.output, result.output


async def test_a_store_that_refuses_writes_stops_the_run_resumably(
        tmp_path: Path, emulator_factory: EmulatorFactory, s3: S3Env,
        s3_proxy: Callable[..., ThrottlingProxy], capsys: pytest.CaptureFixture[str]) -> None:
    emu = await emulator_factory()
    proxy = s3_proxy()
    proxy.refuse = lambda method, path: method == "PUT" and path.endswith(".png")
    manifest = with_output(write_job(tmp_path, prompts(6)), endpoint_url=proxy.url)
    assert await run(manifest, emu.base_url, out_dir=s3.url("denied")) == 3
    out = capsys.readouterr().out
    assert "AccessDenied" in out and "resumable" in out and s3.secret not in out
    with Store(db_of(manifest)) as store:
        assert store.counts()["done"] == 0 and store.image_totals()[0] == 0  # nothing counted as stored
    proxy.refuse = lambda method, path: False
    assert await run(manifest, emu.base_url, out_dir=s3.url("denied")) == 0
    assert check_bucket(manifest, s3, "denied") == {"done": 6}
    assert emu.stats()["tasks_created"] == 6  # the second run stored the first run's results, paid nothing
