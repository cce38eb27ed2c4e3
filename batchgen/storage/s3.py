"""Outputs in an S3-compatible bucket (AWS S3, Cloudflare R2, MinIO, GCS interoperability), via aiobotocore.

Why aiobotocore (compared with obstore and s3fs): it is botocore, so the whole AWS configuration chain
comes for free and behaves as every other AWS tool does — `AWS_ENDPOINT_URL`/`AWS_ENDPOINT_URL_S3`,
`AWS_PROFILE` and `~/.aws/config` profiles, `AWS_*` variables, SSO and instance roles — and it exposes
what the guarantees need by name: `ChecksumSHA256` on PutObject, `ChecksumMode` on HeadObject, presigned
GETs. It runs on aiohttp, which batchgen already uses. obstore (Rust object_store) is faster and smaller
but reads only `AWS_*` variables and instance roles (no profiles without boto3 on top), and its retry
policy gives up after a fixed budget; s3fs is aiobotocore plus a file-system layer we do not need.
Nothing here signs a request: botocore does.

Shape: the storage interface blocks (callers use `asyncio.to_thread`), so this class runs one aiobotocore
client on a private event loop in a daemon thread and hands coroutines to it. The engine's loop is never
blocked by S3, the client and its connection pool are shared by every caller, and sync callers (export,
report) use the same code as the downloaders.

Guarantees (the same as on disk):

* **Verified before done.** Every PutObject carries the SHA-256 checksum of the bytes (the store rejects a
  body that does not match) and the store's answer is checked: its SHA-256 checksum must equal ours, or,
  from a service that returns none, the single-part ETag must equal the MD5 of the bytes. Anything else
  raises, and the scheduler does not record the image. A PutObject is atomic: an object is whole or absent.
* **Resume does not rewrite.** `has_image` is one HeadObject (`ChecksumMode=ENABLED`): same size and same
  checksum (or ETag, or our `x-amz-meta-sha256`) means the object is already there.
* **Throttling never fails a request.** `SlowDown`, 503, 500 and 429 are retried for as long as they last,
  with capped exponential backoff and full jitter (`RetryPolicy`); botocore's own retries are off so this
  is the one policy. Connections that fail are retried a bounded number of times, then `StorageError`.
* **Nothing outside the prefix.** Keys are `<prefix>/<relative name>` and names with `..`, `.`, empty
  segments, a leading `/`, a backslash or NUL are refused (`base.check_relpath`).
* **Credentials only from the AWS chain**, never passed through batchgen's settings, so they cannot reach
  the database, logs, exports or reports; error messages carry the store's code, not the request.

Requests per image: one PutObject on the first run; one HeadObject per image already done when a run
resumes a request with images stored; none for images recorded done in earlier runs.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import hashlib
import io
import random
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import aiohttp

from batchgen.storage.base import Storage, StorageError, check_relpath
from batchgen.storage.outputs import CONTENT_TYPES, ImageInfo, inspect_image

T = TypeVar("T")

SCHEME = "s3://"
# The store's error codes for "slow down / try again": retried for as long as they last.
THROTTLE_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
    "TooManyRequestsException", "ServiceUnavailable", "InternalError", "RequestTimeout", "503", "500",
})
MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
MAX_PRESIGN_S = 7 * 24 * 3600  # SigV4's limit on a presigned URL's lifetime


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with full jitter: wait uniform(0, min(cap, base·2^n)) before retry n+1.

    Throttling and 5xx never fail a request: they are retried until the call passes or, with `patience_s`
    (the run's `run.patience`), until one call has been throttled that long — then the run stops,
    resumably, instead of waiting on a store that is down. Transport failures (no answer at all) are
    retried `transport_tries` times."""

    base_s: float = 0.2
    cap_s: float = 20.0
    transport_tries: int = 8
    patience_s: float | None = None

    def scaled(self, time_scale: float, patience_s: float | None = None) -> RetryPolicy:
        """This policy with its waits multiplied by `time_scale` (the run's `--time-scale`) and the patience
        (unscaled seconds) applied on the same scale."""
        patience = patience_s if patience_s is not None else self.patience_s
        return RetryPolicy(self.base_s * time_scale, self.cap_s * time_scale, self.transport_tries,
                           None if patience is None else patience * time_scale)

    def delay_s(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0.0, min(self.cap_s, self.base_s * (2 ** min(attempt, 30))))


def is_bucket_url(value: str) -> bool:
    return value.startswith(SCHEME)


def parse_bucket_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix/` → ("bucket", "some/prefix"); ValueError naming what is wrong."""
    if not is_bucket_url(url):
        raise ValueError(f"{url!r} is not an s3:// URL")
    bucket, _, prefix = url[len(SCHEME):].partition("/")
    if not bucket:
        raise ValueError(f"{url!r} has no bucket name; write s3://bucket/prefix")
    if not (3 <= len(bucket) <= 63) or not all(c.islower() or c.isdigit() or c in ".-" for c in bucket) \
            or not (bucket[0].isalnum() and bucket[-1].isalnum()):
        raise ValueError(f"bucket name {bucket!r} is not valid: 3-63 lowercase letters, digits, '.' or '-', "
                         "starting and ending with a letter or digit")
    prefix = prefix.strip("/")
    if prefix:
        try:
            check_relpath(prefix)
        except ValueError:
            raise ValueError(f"prefix {prefix!r} of {url!r} may not contain '.', '..', '//', '\\' or NUL "
                             "segments") from None
    return bucket, prefix


def stored_matches(answer: dict[str, Any], *, sha256_hex: str, md5_hex: str, size: int | None = None) -> bool:
    """Whether a PutObject or HeadObject answer shows exactly our bytes: the size (when the answer has
    one) and the strongest evidence it offers — its SHA-256 checksum, else a single-part ETag (the MD5),
    else the `sha256` metadata we wrote with the object."""
    length = answer.get("ContentLength")
    if size is not None and length is not None and int(length) != size:
        return False
    checksum = answer.get("ChecksumSHA256")
    if checksum and "-" not in checksum:  # "-N" marks a composite checksum of a multipart upload
        return bool(checksum == base64.b64encode(bytes.fromhex(sha256_hex)).decode())
    etag = str(answer.get("ETag") or "").strip('"')
    if len(etag) == 32 and "-" not in etag:
        return etag == md5_hex
    meta = answer.get("Metadata") or {}
    return bool(meta.get("sha256") == sha256_hex)


def _error_code(error: BaseException) -> tuple[str, int | None]:
    response = getattr(error, "response", None) or {}
    code = str((response.get("Error") or {}).get("Code") or "")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return code, status


class S3Storage(Storage):
    """A job's outputs under `s3://bucket/prefix`. Endpoint and region: arguments, else the AWS chain."""

    def __init__(self, url: str, *, endpoint_url: str | None = None, region: str | None = None,
                 retry: RetryPolicy | None = None, create_bucket: bool = True) -> None:
        self.bucket, self.prefix = parse_bucket_url(url)
        self.location = SCHEME + self.bucket + (f"/{self.prefix}" if self.prefix else "")
        self.endpoint_url = endpoint_url
        self.region = region
        self.retry = retry or RetryPolicy()
        self._rng = random.Random()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="batchgen-s3", daemon=True)
        self._thread.start()
        self._client: Any = None
        self._client_cm: Any = None
        self._closed = False
        # Held while submitting to the loop and while closing: a call is either refused, or submitted
        # before the shutdown and cancelled by it; none can wait forever on a stopped loop.
        self._lock = threading.Lock()
        try:
            self._call(self._open)
            if create_bucket:
                self._call(self._ensure_bucket)
        except BaseException:
            self.close()
            raise

    # --- the private loop -------------------------------------------------------------------------

    def _call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run `fn(*args)` on the private loop and wait for it (from any thread but that loop's)."""
        with self._lock:
            if self._closed:
                raise StorageError(f"{self.location}: the run is stopping; not stored")
            future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(
                fn(*args), self._loop)  # type: ignore[arg-type]
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise StorageError(f"{self.location}: cancelled while the run stopped") from None

    async def _open(self) -> None:
        from aiobotocore.session import get_session
        from botocore.config import Config

        config = Config(
            retries={"total_max_attempts": 1},  # RetryPolicy is the one retry policy
            signature_version="s3v4",
            connect_timeout=10, read_timeout=60, max_pool_connections=32,
            # Newer botocore adds CRC checksums by default, which some S3-compatible services refuse; we
            # send our own SHA-256 explicitly instead.
            request_checksum_calculation="when_required", response_checksum_validation="when_required",
        )
        kwargs: dict[str, Any] = {"config": config}
        if self.endpoint_url:
            kwargs["endpoint_url"] = self.endpoint_url
        if self.region:
            kwargs["region_name"] = self.region
        self._client_cm = get_session().create_client("s3", **kwargs)
        self._client = await self._client_cm.__aenter__()

    async def _retrying(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """`fn()` with throttling and 5xx retried indefinitely, transport failures a few times."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

        throttled = transport = 0
        since = asyncio.get_running_loop().time()
        while True:
            try:
                return await fn()
            except (NoCredentialsError, PartialCredentialsError):
                raise StorageError(f"{what}: no usable credentials for the object store; set them the AWS way "
                                   "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance "
                                   "role) and run again") from None
            except ClientError as error:
                code, status = _error_code(error)
                if code in THROTTLE_CODES or status == 429 or (status is not None and status >= 500):
                    throttled += 1
                    patience = self.retry.patience_s
                    if patience is not None and asyncio.get_running_loop().time() - since > patience:
                        raise StorageError(f"{what}: the object store kept answering {code or status} "
                                           f"({throttled} tries); nothing failed: run again later") from None
                    await asyncio.sleep(self.retry.delay_s(throttled, self._rng))
                    continue
                raise StorageError(f"{what}: the object store refused it ({code or 'error'}, HTTP {status})"
                                   ) from None
            except (TimeoutError, BotoCoreError, OSError, aiohttp.ClientError) as error:
                transport += 1
                if transport >= self.retry.transport_tries:
                    raise StorageError(f"{what}: the object store is unreachable after {transport} tries "
                                       f"({type(error).__name__}); check AWS_ENDPOINT_URL or "
                                       "output.endpoint_url and run again") from None
                await asyncio.sleep(self.retry.delay_s(transport, self._rng))

    async def _ensure_bucket(self) -> None:
        """Create the bucket when it does not exist (MinIO, a test server, a fresh account); a bucket we
        may not look at (403) is left alone: writing may still be allowed."""
        from botocore.exceptions import ClientError

        async def missing() -> bool:
            try:
                await self._client.head_bucket(Bucket=self.bucket)
                return False
            except ClientError as error:
                code, status = _error_code(error)
                if status == 404 or code in ("404", "NoSuchBucket", "NotFound"):
                    return True
                if status == 403:
                    return False
                raise

        if not await self._retrying(f"{SCHEME}{self.bucket}", missing):
            return
        params: dict[str, Any] = {"Bucket": self.bucket}
        region = self._client.meta.region_name
        if region and region != "us-east-1":
            params["CreateBucketConfiguration"] = {"LocationConstraint": region}
        await self._retrying(f"creating bucket {SCHEME}{self.bucket}", lambda: self._client.create_bucket(**params))

    # --- names --------------------------------------------------------------------------------------

    def key(self, rel: str) -> str:
        """The object key of `rel` under the prefix (ValueError if `rel` could leave it)."""
        check_relpath(rel)
        return f"{self.prefix}/{rel}" if self.prefix else rel

    # --- the interface ------------------------------------------------------------------------------

    async def _put(self, rel: str, body: bytes | IO[bytes], sha256_hex: str, md5_hex: str,
                   content_type: str) -> None:
        key = self.key(rel)
        checksum = base64.b64encode(bytes.fromhex(sha256_hex)).decode()

        async def put() -> dict[str, Any]:
            if not isinstance(body, bytes):
                body.seek(0)
            answer: dict[str, Any] = await self._client.put_object(
                Bucket=self.bucket, Key=key, Body=body, ContentType=content_type, ChecksumAlgorithm="SHA256",
                ChecksumSHA256=checksum, Metadata={"sha256": sha256_hex})
            return answer

        answer = await self._retrying(self.describe(rel), put)
        if not stored_matches(answer, sha256_hex=sha256_hex, md5_hex=md5_hex):
            raise StorageError(f"{self.describe(rel)}: the object store did not confirm the checksum of what "
                               "was written; it is not counted as saved")

    def save_image(self, relpath_no_ext: str, data: bytes, info: ImageInfo | None = None) -> tuple[str, ImageInfo]:
        info = info or inspect_image(data)
        rel = relpath_no_ext + info.extension
        self.key(rel)  # refuse an unsafe name before any request
        self._call(self._put, rel, data, info.sha256, hashlib.md5(data, usedforsecurity=False).hexdigest(),
                   CONTENT_TYPES[info.extension])
        return rel, info

    async def _head(self, rel: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        key = self.key(rel)

        async def head() -> dict[str, Any] | None:
            try:
                answer: dict[str, Any] = await self._client.head_object(Bucket=self.bucket, Key=key,
                                                                         ChecksumMode="ENABLED")
                return answer
            except ClientError as error:
                code, status = _error_code(error)
                if code in MISSING_CODES or status == 404:
                    return None
                raise

        return await self._retrying(self.describe(rel), head)

    def has_image(self, rel: str, sha256: str, size: int | None = None) -> bool:
        try:
            self.key(rel)
        except ValueError:
            return False
        answer = self._call(self._head, rel)
        if answer is None:
            return False
        # Without the bytes we have no MD5: an ETag cannot confirm, so "" never matches one.
        return stored_matches(answer, sha256_hex=sha256, md5_hex="", size=size) or bool(
            (answer.get("Metadata") or {}).get("sha256") == sha256
            and (size is None or answer.get("ContentLength") == size))

    async def _get(self, rel: str) -> bytes | None:
        from botocore.exceptions import ClientError

        key = self.key(rel)

        async def get() -> bytes | None:
            try:
                answer = await self._client.get_object(Bucket=self.bucket, Key=key)
            except ClientError as error:
                code, status = _error_code(error)
                if code in MISSING_CODES or status == 404:
                    return None
                raise
            async with answer["Body"] as stream:
                data: bytes = await stream.read()
                return data

        return await self._retrying(self.describe(rel), get)

    def read_bytes(self, rel: str) -> bytes | None:
        return self._call(self._get, rel)

    def exists(self, rel: str) -> bool:
        return self._call(self._head, rel) is not None

    async def _list(self, rel_dir: str) -> set[str]:
        folder = self.key(rel_dir.strip("/")) + "/" if rel_dir.strip("/") else (
            f"{self.prefix}/" if self.prefix else "")
        names: set[str] = set()
        token: str | None = None
        while True:
            params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": folder, "Delimiter": "/"}
            if token:
                params["ContinuationToken"] = token
            page = await self._retrying(f"listing {self.location}/{rel_dir}",
                                        lambda p=params: self._client.list_objects_v2(**p))  # type: ignore[misc]
            names.update(obj["Key"][len(folder):] for obj in page.get("Contents", []))
            token = page.get("NextContinuationToken")
            if not token:
                return names

    def names_under(self, rel_dir: str) -> set[str]:
        return self._call(self._list, rel_dir)

    async def _move(self, rel: str, new_rel: str) -> bool:
        """CopyObject then DeleteObject (S3 has no rename); the copy keeps the checksum and metadata."""
        if await self._head(rel) is None:
            return False
        source, target = self.key(rel), self.key(new_rel)
        await self._retrying(self.describe(new_rel), lambda: self._client.copy_object(
            Bucket=self.bucket, Key=target, CopySource={"Bucket": self.bucket, "Key": source},
            ChecksumAlgorithm="SHA256"))
        await self._retrying(self.describe(rel), lambda: self._client.delete_object(Bucket=self.bucket, Key=source))
        return True

    def move(self, rel: str, new_rel: str) -> bool:
        return self._call(self._move, rel, new_rel)

    def put_bytes(self, rel: str, data: bytes, content_type: str) -> None:
        self._call(self._put, rel, data, hashlib.sha256(data).hexdigest(),
                   hashlib.md5(data, usedforsecurity=False).hexdigest(), content_type)

    @contextlib.contextmanager
    def open_text(self, rel: str, *, newline: str | None = None) -> Iterator[IO[str]]:
        """Spooled to a local temporary file, then one verified PutObject: readers of the bucket see the
        previous object or the new one, never a part, and a failure leaves the previous one."""
        self.key(rel)
        content_type = "text/csv" if rel.endswith(".csv") else (
            "text/html" if rel.endswith(".html") else "application/x-ndjson")
        with tempfile.TemporaryFile() as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8", newline=newline, write_through=True)
            try:
                yield text
                text.flush()
                raw.seek(0)
                sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
                while chunk := raw.read(1 << 20):
                    sha.update(chunk)
                    md5.update(chunk)
                self._call(self._put, rel, raw, sha.hexdigest(), md5.hexdigest(), content_type + "; charset=utf-8")
            finally:
                text.detach()

    async def _presign(self, rel: str, expires_s: int) -> str:
        url: str = await self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.key(rel)}, ExpiresIn=expires_s)
        return url

    def link(self, rel: str, expires_s: int) -> str:
        return self._call(self._presign, rel, min(expires_s, MAX_PRESIGN_S))

    def describe(self, rel: str) -> str:
        return f"{SCHEME}{self.bucket}/{self.key(rel)}"

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True

        async def shutdown() -> None:
            current = asyncio.current_task()
            for task in asyncio.all_tasks():
                if task is not current:
                    task.cancel()
            if self._client_cm is not None:
                with contextlib.suppress(Exception):
                    await self._client_cm.__aexit__(None, None, None)

        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        if not self._loop.is_running():
            self._loop.close()
