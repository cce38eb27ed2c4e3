"""The S3 storage against a real S3-protocol server (moto on 127.0.0.1): the bucket created, images stored
and verified, resume checks, throttling retried, names that try to leave the prefix refused."""

from __future__ import annotations

import base64
import hashlib
import io
import random
from collections.abc import Callable

import pytest
from PIL import Image

from batchgen.storage.base import StorageError, check_relpath
from batchgen.storage.outputs import NotAnImageError
from batchgen.storage.s3 import RetryPolicy, S3Storage, parse_bucket_url, stored_matches
from tests.s3_fixtures import S3Env, ThrottlingProxy

FAST = RetryPolicy(base_s=0.005, cap_s=0.05, transport_tries=3)


def png(colour: str = "red", size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def test_bucket_urls_and_names() -> None:
    assert parse_bucket_url("s3://my-bucket/jobs/cat/") == ("my-bucket", "jobs/cat")
    assert parse_bucket_url("s3://my.bucket") == ("my.bucket", "")
    for bad in ("s3://", "s3://UPPER/x", "s3://ab/x", "s3://-bucket/x", "s3://bucket/a/../b", "s3://bucket/a//b"):
        with pytest.raises(ValueError):
            parse_bucket_url(bad)
    assert check_relpath("a/b_1.png") == ["a", "b_1.png"]
    for bad in ("", "/abs.png", "../up.png", "a/../../b.png", "a//b.png", "./a.png", "a\\b.png", "a\x00.png"):
        with pytest.raises(ValueError):
            check_relpath(bad)


def test_stored_matches_prefers_the_checksum_then_the_etag() -> None:
    data = b"some bytes"
    sha, md5 = hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest()
    b64 = base64.b64encode(hashlib.sha256(data).digest()).decode()
    assert stored_matches({"ChecksumSHA256": b64, "ETag": '"whatever-kms"'}, sha256_hex=sha, md5_hex=md5)
    assert not stored_matches({"ChecksumSHA256": base64.b64encode(b"x" * 32).decode()}, sha256_hex=sha, md5_hex=md5)
    assert stored_matches({"ETag": f'"{md5}"'}, sha256_hex=sha, md5_hex=md5)
    assert not stored_matches({"ETag": '"' + "0" * 32 + '"'}, sha256_hex=sha, md5_hex=md5)
    assert not stored_matches({"ETag": f'"{md5}"', "ContentLength": 3}, sha256_hex=sha, md5_hex=md5, size=10)
    assert not stored_matches({}, sha256_hex=sha, md5_hex=md5)  # no evidence is no verification


def test_backoff_is_capped_with_full_jitter() -> None:
    policy = RetryPolicy(base_s=0.5, cap_s=4.0)
    rng = random.Random(3)
    waits = [policy.delay_s(attempt, rng) for attempt in range(1, 40) for _ in range(20)]
    assert all(0 <= w <= 4.0 for w in waits)
    assert min(waits) < 0.1 and max(waits) > 3.0  # full jitter: anywhere from 0 up to the cap


def test_creates_the_bucket_writes_verifies_and_reads(s3: S3Env) -> None:
    with S3Storage(s3.url("jobs/cat"), retry=FAST) as storage:
        assert s3.bucket in [b["Name"] for b in s3.client().list_buckets()["Buckets"]]
        data = png()
        rel, info = storage.save_image("kitchen/MUG-1_1", data)
        assert rel == "kitchen/MUG-1_1.png" and info.width == 8 and info.sha256 == hashlib.sha256(data).hexdigest()
        head = s3.client().head_object(Bucket=s3.bucket, Key="jobs/cat/kitchen/MUG-1_1.png", ChecksumMode="ENABLED")
        assert head["ContentLength"] == len(data) and head["ContentType"] == "image/png"
        assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(data).digest()).decode()
        assert storage.has_image(rel, info.sha256, len(data))
        assert not storage.has_image(rel, hashlib.sha256(b"other").hexdigest(), len(data))
        assert not storage.has_image("kitchen/none.png", info.sha256)
        assert storage.read_bytes(rel) == data and storage.read_bytes("nope.png") is None
        assert storage.names_under("kitchen") == {"MUG-1_1.png"}
        assert storage.describe(rel) == f"s3://{s3.bucket}/jobs/cat/kitchen/MUG-1_1.png"


def test_refuses_non_images_and_names_that_leave_the_prefix(s3: S3Env) -> None:
    with S3Storage(s3.url("jobs/a"), retry=FAST) as storage:
        with pytest.raises(NotAnImageError):
            storage.save_image("x_1", b"<html>not an image</html>")
        for escape in ("../b/x_1", "../../x_1", "/x_1", "a/./x_1", "a//x_1"):
            with pytest.raises(ValueError):
                storage.save_image(escape, png())
        storage.save_image("inside_1", png())
    assert s3.object_keys() == ["jobs/a/inside_1.png"]  # nothing anywhere else in the bucket


def test_text_files_replace_the_object_whole_or_not_at_all(s3: S3Env) -> None:
    with S3Storage(s3.url("p"), retry=FAST) as storage:
        with storage.open_text("results.csv", newline="") as fh:
            fh.write("a,b\r\n1,2\r\n")
        with pytest.raises(RuntimeError), storage.open_text("results.csv") as fh:
            fh.write("half")
            raise RuntimeError("killed mid-export")
        assert storage.read_bytes("results.csv") == b"a,b\r\n1,2\r\n"


def test_throttling_is_retried_until_it_passes(s3: S3Env, s3_proxy: Callable[..., ThrottlingProxy]) -> None:
    # Every PUT is answered 503 SlowDown five times before one goes through.
    seen: dict[str, int] = {}

    def throttle(method: str, path: str, n: int) -> bool:
        if method != "PUT" or path.count("/") < 2:
            return False
        seen[path] = seen.get(path, 0) + 1
        return seen[path] % 6 != 0

    proxy = s3_proxy(throttle)
    with S3Storage(s3.url("t"), endpoint_url=proxy.url, retry=FAST) as storage:
        for i in range(4):
            storage.save_image(f"img{i}_1", png(size=(4 + i, 4)))
    assert len(proxy.requests("PUT", 503)) == 4 * 5
    assert len([p for p in proxy.requests("PUT", 200) if p.count("/") >= 2]) == 4
    assert s3.object_keys("t/") == [f"t/img{i}_1.png" for i in range(4)]


def test_refusals_are_faults_with_a_message_not_a_retry_loop(s3: S3Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError) as caught:
        S3Storage(s3.url("x"), retry=FAST)
    assert "credentials" in str(caught.value) and s3.secret not in str(caught.value)
    assert caught.value.exit_code == 3


def test_a_store_throttling_past_the_patience_stops_instead_of_waiting_forever(
        s3: S3Env, s3_proxy: Callable[..., ThrottlingProxy]) -> None:
    proxy = s3_proxy(lambda method, path, n: method == "PUT" and path.endswith(".png"))
    policy = RetryPolicy(base_s=0.005, cap_s=0.02, patience_s=1.0)  # room for three PUTs on a loaded machine
    with S3Storage(s3.url("p"), endpoint_url=proxy.url, retry=policy) as storage, \
            pytest.raises(StorageError) as caught:
        storage.save_image("x_1", png())
    assert "SlowDown" in str(caught.value) and "nothing failed" in str(caught.value)
    assert len(proxy.requests("PUT", 503)) >= 3 and s3.object_keys("p/") == []


def test_moving_an_image_aside_copies_then_deletes(s3: S3Env) -> None:
    from batchgen.storage import aside

    with S3Storage(s3.url("m"), retry=FAST) as storage:
        rel, info = storage.save_image("SKU-1/plain_1", png("blue"))
        target = aside.aside_relpath(rel, info.sha256)
        assert aside.move_aside(storage, rel, target)
        assert not aside.move_aside(storage, rel, target)  # already moved: a no-op, as on disk
        assert storage.has_image(target, info.sha256, info.bytes)
        aside.write_aside(storage, "_rejected/other.png", png("green"))
    assert s3.object_keys("m/") == sorted([f"m/{target}", "m/_rejected/other.png"])
