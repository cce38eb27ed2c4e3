"""A real S3-protocol server on 127.0.0.1 for the object-storage tests (registered in tests/conftest.py).

* `moto_endpoint` (session) — moto's server mode (`ThreadedMotoServer`) on an ephemeral port; its URL.
* `s3` — a fresh bucket name and fake credentials set in this test's environment only (the AWS chain reads
  `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...), plus a boto3 client to look at what was stored. The secret
  is unique per test so a test can prove it never reached the database, logs, exports or reports.
* `ThrottlingProxy` — a small aiohttp proxy on 127.0.0.1 in front of moto that answers the requests its
  rule picks with `503 SlowDown`, and logs every request (method, key, status) so tests can count them.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
ACCESS_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                 b"<Message>Access Denied</Message></Error>")
_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "expect", "connection", "content-encoding"}


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@dataclass
class S3Env:
    endpoint: str
    bucket: str
    secret: str
    env: dict[str, str]

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}" + (f"/{prefix}" if prefix else "")

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.secret)

    def object_keys(self, prefix: str = "") -> list[str]:
        out: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out += [obj["Key"] for obj in page.get("Contents", [])]
        return sorted(out)


@pytest.fixture
def s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> S3Env:
    secret = f"fake-secret-{uuid.uuid4().hex}"
    env = {"AWS_ACCESS_KEY_ID": "AKIAFAKEFORTESTS0000", "AWS_SECRET_ACCESS_KEY": secret,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": moto_endpoint,
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
           "AWS_EC2_METADATA_DISABLED": "true"}  # never look for an instance role off 127.0.0.1
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return S3Env(moto_endpoint, f"bg-{uuid.uuid4().hex[:16]}", secret, env)


@dataclass
class ThrottlingProxy:
    """Forwards to `upstream`; `throttle(method, path, n)` (n = requests seen so far, from 1) picks the
    requests answered 503 SlowDown instead."""

    upstream: str
    throttle: Callable[[str, str, int], bool] = lambda method, path, n: False
    log: list[tuple[str, str, int]] = field(default_factory=list)
    refuse: Callable[[str, str], bool] = lambda method, path: False  # answered 403 AccessDenied
    url: str = ""

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        n = len(self.log) + 1
        if self.refuse(request.method, request.path):
            await request.read()
            self.log.append((request.method, request.path, 403))
            return web.Response(status=403, body=ACCESS_DENIED, content_type="application/xml")
        if self.throttle(request.method, request.path, n):
            await request.read()
            self.log.append((request.method, request.path, 503))
            return web.Response(status=503, body=SLOW_DOWN, content_type="application/xml")
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        async with self._session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                         data=body) as answer:
            data = await answer.read()
            out = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_HEADERS}
            self.log.append((request.method, request.path, answer.status))
            return web.Response(status=answer.status, body=data, headers=out)

    def requests(self, method: str, status: int | None = None) -> list[str]:
        return [p for m, p, s in self.log if m == method and (status is None or s == status)]

    def close(self) -> None:
        async def stop() -> None:
            await self._runner.cleanup()
            await self._session.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def s3_proxy(s3: S3Env) -> Iterator[Callable[..., ThrottlingProxy]]:
    made: list[ThrottlingProxy] = []

    def make(throttle: Callable[[str, str, int], bool] | None = None) -> ThrottlingProxy:
        proxy = ThrottlingProxy(s3.endpoint, throttle or (lambda method, path, n: False))
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()
