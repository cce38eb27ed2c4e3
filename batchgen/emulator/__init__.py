"""The built-in emulator of the Evolink image API (issue 3).

A real aiohttp server on 127.0.0.1 speaking the API's wire contract — generation, tasks, batch polls,
credits and the Files API on one port — with emulated latencies, accounts, a rate limit, fault injection
and a time scale, so batchgen can be tried, tested and benchmarked without a paid key. See
docs/emulator.md. Modules: config (settings, scenario YAML), app (gateway), api_routes, files_routes,
control_routes (/_emulator/), tasks (lazy task simulation), files (upload store), images (PNG results),
faults, accounts, ratelimit, clock, stats, server (Emulator, serve_forever).
"""

from batchgen.emulator.config import EmulatorConfig
from batchgen.emulator.server import Emulator, serve_forever

__all__ = ["Emulator", "EmulatorConfig", "serve_forever"]
