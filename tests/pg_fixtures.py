"""A throwaway PostgreSQL 15 server for the tests (registered as a plugin in tests/conftest.py).

Never a mock: `pg_server` (session scope) runs Debian's `initdb` and `pg_ctl` on a temporary directory
and a free loopback port, with durability switched off (fsync) because the data is thrown away. The server
refuses to run as root, so as root it runs as the `postgres` system user (`runuser`); otherwise as the
current user. Trust authentication on 127.0.0.1, except for the role `batchpw`, which needs its password
(the tests of the secret rule). Without the binaries the tests that need it skip locally, but fail in CI
(`CI=true`), where `.ci/run` installs them.

`pg_url` gives each test a fresh database on that server: `postgresql://batch@127.0.0.1:PORT/t_<hex>`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PG_BIN_DIRS = [Path("/usr/lib/postgresql/15/bin"), *sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)]
PG_PASSWORD = "s3cret-Pg-pass"


@dataclass(frozen=True)
class PgServer:
    port: int
    datadir: Path

    def url(self, db: str = "postgres", user: str = "batch", password: str | None = None) -> str:
        auth = f"{user}:{password}" if password else user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{db}"

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def new_database(self) -> str:
        name = "t_" + uuid.uuid4().hex[:12]
        self.admin(f"CREATE DATABASE {name}")
        return name


def _bin_dir() -> Path | None:
    for d in PG_BIN_DIRS:
        if (d / "initdb").exists() and (d / "pg_ctl").exists():
            return d
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def throwaway_server() -> Iterator[PgServer]:
    """Start a PostgreSQL server on a temporary directory and a free loopback port; remove it after.
    Raises FileNotFoundError without the binaries. (The benchmarks use it too.)"""
    bindir = _bin_dir()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found; apt-get install postgresql")
    root = Path(tempfile.mkdtemp(prefix="batchgen-pg-"))
    datadir = root / "data"
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    env = {**os.environ, "LC_ALL": "C"}
    try:
        if as_root:
            shutil.chown(root, "postgres", "postgres")
        port = _free_port()
        subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(datadir), "-U", "batch", "--auth=trust",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, env=env)
        hba_text = ("host all batchpw 127.0.0.1/32 scram-sha-256\n"
                    "host all all 127.0.0.1/32 trust\nlocal all all trust\n")
        subprocess.run([*prefix, "sh", "-c", f"cat > {datadir / 'pg_hba.conf'}"], input=hba_text.encode(),
                       check=True)
        opts = (f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200 -c shared_buffers=32MB")
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(datadir), "-o", opts, "-l", str(root / "log"),
                        "-w", "-t", "60", "start"], check=True, capture_output=True, env=env)
        server = PgServer(port=port, datadir=datadir)
        try:
            server.admin(f"CREATE ROLE batchpw LOGIN PASSWORD '{PG_PASSWORD}' CREATEDB")
            yield server
        finally:
            with contextlib.suppress(Exception):
                subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "immediate", "-w",
                                "stop"], capture_output=True, env=env, timeout=60)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    if _bin_dir() is None:
        reason = "PostgreSQL server binaries (initdb, pg_ctl) not found; apt-get install postgresql"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI must run the PostgreSQL tests)")
        pytest.skip(reason)
    with throwaway_server() as server:
        yield server


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """A fresh, empty database for one test."""
    return pg_server.url(pg_server.new_database())


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """Runs an engine test on both backends: None (the SQLite file beside the manifest) or the URL of a
    fresh PostgreSQL database, which tests/run_support.py then uses for every run and check."""
    from tests import run_support

    url = None if request.param == "sqlite" else request.getfixturevalue("pg_url")
    run_support.DB_URL = url
    try:
        yield url
    finally:
        run_support.DB_URL = None
