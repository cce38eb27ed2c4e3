"""Emulator fixtures for every test (registered as a plugin in tests/conftest.py).

* `emulator_factory` — `await emulator_factory(**config_fields)` or `await emulator_factory(config)` starts an
  in-process `Emulator` on 127.0.0.1 (ephemeral port) and closes it at teardown. Unless given, the time
  scale is `FAST_TIME_SCALE` and the seed `SEED`.
* `emulator` — one such emulator with the defaults, already running: `emulator.base_url`, `emulator.stats()`.
* `emulator_process` — `emulator_process(time_scale=..., seed=..., scenario=path, rate_limit=R, api_keys=[...])`
  runs `python -m batchgen emulator --port 0 ...` in its own process (for tests that SIGKILL the runner, and
  benchmarks), waits for its "listening on" line and returns an `EmulatorProcess` with `.base_url`,
  `.stats()` and `.tasks()`; every process started is killed at teardown.

The key is any non-empty Bearer token unless `api_keys` is set; `API_KEY` is a convenient one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import pytest
import pytest_asyncio

from batchgen.emulator import Emulator, EmulatorConfig

API_KEY = "sk-evo-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
FAST_TIME_SCALE = 0.01
SEED = 1234
_REPO = Path(__file__).resolve().parent.parent
_START_TIMEOUT_S = 20.0


class EmulatorFactory(Protocol):
    def __call__(self, config: EmulatorConfig | None = None, /, **fields: Any) -> Awaitable[Emulator]: ...


@pytest_asyncio.fixture
async def emulator_factory() -> AsyncIterator[EmulatorFactory]:
    started: list[Emulator] = []

    async def start(config: EmulatorConfig | None = None, /, **fields: Any) -> Emulator:
        if config is None:
            config = EmulatorConfig(**{"time_scale": FAST_TIME_SCALE, "seed": SEED, **fields})
        elif fields:
            config = config.model_copy(update=fields)
        emu = Emulator(config)
        await emu.start()
        started.append(emu)
        return emu

    yield start
    for emu in reversed(started):
        await emu.close()


@pytest_asyncio.fixture
async def emulator(emulator_factory: EmulatorFactory) -> Emulator:
    return await emulator_factory()


class EmulatorProcess:
    """An emulator in its own process; killed by the fixture at teardown (or by `stop()`)."""

    def __init__(self, process: subprocess.Popen[str], base_url: str) -> None:
        self.process = process
        self.base_url = base_url

    @property
    def pid(self) -> int:
        return self.process.pid

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base_url + path, timeout=10) as response:
            return json.loads(response.read())

    def stats(self) -> dict[str, Any]:
        return self.get("/_emulator/stats")

    def tasks(self) -> list[dict[str, Any]]:
        return self.get("/_emulator/tasks")["data"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def _read_first_line(process: subprocess.Popen[str], timeout_s: float) -> str:
    """The first stdout line, without hanging forever if the process never prints one."""
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(process.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout_s)
    return line[0] if line else ""


@pytest.fixture
def emulator_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., EmulatorProcess]]:
    started: list[EmulatorProcess] = []

    def start(*, time_scale: float = FAST_TIME_SCALE, seed: int | None = SEED, scenario: Path | str | None = None,
              rate_limit: float | None = None, api_keys: Sequence[str] = (),
              extra_args: Sequence[str] = ()) -> EmulatorProcess:
        args = [sys.executable, "-m", "batchgen", "emulator", "--port", "0", "--time-scale", str(time_scale)]
        if seed is not None:
            args += ["--seed", str(seed)]
        if scenario is not None:
            args += ["--scenario", str(scenario)]
        if rate_limit is not None:
            args += ["--rate-limit", str(rate_limit)]
        for key in api_keys:
            args += ["--api-key", key]
        args += list(extra_args)
        log = tmp_path_factory.mktemp("emulator") / "stderr.log"
        with log.open("w") as stderr:
            process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=_REPO)
        line = _read_first_line(process, _START_TIMEOUT_S)
        prefix = "batchgen emulator listening on "
        if not line.startswith(prefix):
            process.kill()
            process.wait(timeout=10)
            raise RuntimeError(f"the emulator did not start: {line!r}; stderr: {log.read_text()[-2000:]}")
        emu = EmulatorProcess(process, line[len(prefix):].strip())
        started.append(emu)
        return emu

    yield start
    for emu in started:
        emu.stop()


__all__ = ["API_KEY", "AUTH", "FAST_TIME_SCALE", "SEED", "EmulatorFactory", "EmulatorProcess"]
