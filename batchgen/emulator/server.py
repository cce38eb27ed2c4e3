"""Running the emulator: in-process as an async context manager, or as a blocking server for the CLI.

`Emulator` starts inside the running event loop (tests, benchmarks, `batchgen run --emulator`) on
127.0.0.1 and an ephemeral port unless told otherwise. `serve_forever` is the `batchgen emulator` command:
it prints one line with the base URL (so a parent process can read the port it got) and serves until
Ctrl-C or SIGTERM; an address it cannot listen on is a ConfigError (exit 2), as for `batchgen review`.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from types import TracebackType
from typing import Any

from aiohttp import web

from batchgen.emulator.api_routes import STATE
from batchgen.emulator.app import make_app
from batchgen.emulator.config import EmulatorConfig
from batchgen.emulator.state import EmulatorState
from batchgen.errors import listen_error


class Emulator:
    """An emulator serving on `host:port` (port 0: a free port) while the `async with` block runs."""

    def __init__(self, config: EmulatorConfig | None = None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config or EmulatorConfig()
        self.host = host
        self.port = port
        self.app = make_app(self.config)
        self._runner: web.AppRunner | None = None

    @property
    def state(self) -> EmulatorState:
        return self.app[STATE]

    @property
    def base_url(self) -> str:
        """Base of both route sets (API and Files API), e.g. "http://127.0.0.1:54321"."""
        if self._runner is None:
            raise RuntimeError("the emulator is not running")
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        # No access log: at thousands of requests a second it would cost more than the requests.
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, backlog=1024, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def stats(self) -> dict[str, Any]:
        """The same as GET /_emulator/stats."""
        return self.state.snapshot()

    def tasks(self) -> list[dict[str, Any]]:
        """The same rows as GET /_emulator/tasks."""
        return self.state.tasks.listing(self.state.clock.now())

    def advance(self, emulated_s: float) -> None:
        """Move the emulated clock forward (expiry tests without waiting)."""
        self.state.clock.advance(emulated_s)

    def set_credits(self, api_key: str, remaining: float) -> None:
        self.state.accounts.set_credits(api_key, remaining)

    def revoke(self, api_key: str) -> None:
        """Every call with this key is 401 from now on."""
        self.state.accounts.revoke(api_key)


def serve_forever(config: EmulatorConfig, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve until Ctrl-C or SIGTERM; first print and flush exactly one line with the base URL."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(config, host, port))


async def _serve(config: EmulatorConfig, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # The handler only sets a flag; shutdown happens below, in order.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    emulator = Emulator(config, host=host, port=port)
    try:
        await emulator.start()
    except OSError as error:  # a port in use, an address not of this machine: the flag to change, exit 2
        raise listen_error(host, port, error) from None
    try:
        sys.stdout.write(f"batchgen emulator listening on {emulator.base_url}\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        await emulator.close()
