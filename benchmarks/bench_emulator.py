"""How many requests a second the emulator sustains (issue 3 asks for at least 2,000 on 2 cores).

The emulator runs in its own process (`python -m batchgen emulator --port 0`), exactly as a benchmark of
batchgen would run it; this process is the load. The load generator is a minimal keep-alive HTTP/1.1
client on raw asyncio streams, so that the client, not the server, is the cheap side. The mix is what a
batch runner sends: mostly single polls, some submits (with Idempotency-Keys), some batch polls of 50 ids,
the occasional credits check. Bounded in count and time; 127.0.0.1 only; not part of the test suite.

    .venv/bin/python benchmarks/bench_emulator.py [--requests 40000] [--seconds 20] [--connections 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KEY = "sk-evo-bench"
TARGET_RPS = 2000


def start_emulator() -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "batchgen", "emulator", "--port", "0", "--time-scale", "0.01", "--seed", "1"],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )
    line = process.stdout.readline() if process.stdout else ""
    if "listening on" not in line:
        process.kill()
        raise SystemExit(f"the emulator did not start: {line!r}")
    return process, line.rsplit(" ", 1)[-1].strip()


class Connection:
    """One keep-alive connection; `request` sends and reads one whole response."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, f"{host}:{port}")

    async def request(self, method: str, path: str, body: bytes = b"", extra: str = "") -> tuple[int, bytes]:
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n")
        self.writer.write(head.encode() + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = next(int(v) for k, _, v in (line.partition(": ") for line in lines[1:])
                      if k.lower() == "content-length")
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def load(base_url: str, total: int, seconds: float, connections: int) -> dict[str, object]:
    host, port = base_url.removeprefix("http://").split(":")
    conns = [await Connection.open(host, int(port)) for _ in range(connections)]
    task_ids: list[str] = []
    # Seed some tasks to poll.
    for i in range(200):
        _, body = await conns[0].request("POST", "/v1/images/generations",
                                         json.dumps({"prompt": f"warm-up {i}", "model": "z-image-turbo"}).encode())
        task_ids.append(json.loads(body)["id"])

    rng = random.Random(1)
    sent = 0
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + seconds

    async def worker(conn: Connection, index: int) -> None:
        nonlocal sent
        n = 0
        while sent < total and time.monotonic() < deadline:
            sent += 1
            n += 1
            u = rng.random()
            if u < 0.80:
                status, _ = await conn.request("GET", f"/v1/tasks/{rng.choice(task_ids)}")
            elif u < 0.95:
                payload = json.dumps({"prompt": f"bench {index}-{n}", "model": "gemini-2.5-flash-image",
                                      "n": 1 + n % 4, "size": "4:3"}).encode()
                status, body = await conn.request("POST", "/v1/images/generations", payload,
                                                  f"Idempotency-Key: bench-{index:04d}-{n:012d}\r\n")
                if status == 200 and len(task_ids) < 5000:
                    task_ids.append(json.loads(body)["id"])
            elif u < 0.99:
                payload = json.dumps({"task_ids": rng.sample(task_ids, 50)}).encode()
                status, _ = await conn.request("POST", "/v1/tasks/batch", payload)
            else:
                status, _ = await conn.request("GET", "/v1/credits")
            statuses[status] = statuses.get(status, 0) + 1

    started = time.monotonic()
    await asyncio.gather(*(worker(c, i) for i, c in enumerate(conns)))
    elapsed = time.monotonic() - started
    for conn in conns:
        conn.close()
    done = sum(statuses.values())
    return {"requests": done, "seconds": round(elapsed, 2), "requests_per_s": round(done / elapsed),
            "statuses": statuses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=40_000, help="stop after this many requests")
    parser.add_argument("--seconds", type=float, default=20.0, help="stop after this long")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    process, base_url = start_emulator()
    try:
        result = asyncio.run(load(base_url, args.requests, args.seconds, args.connections))
        with urllib.request.urlopen(base_url + "/_emulator/stats", timeout=10) as response:
            stats = json.loads(response.read())
    finally:
        process.kill()
        process.wait()
    rps = result["requests_per_s"]
    print(f"emulator: {result['requests']} requests in {result['seconds']} s = {rps} requests/s "
          f"over {args.connections} connections; statuses {result['statuses']}")
    print(f"emulator stats: tasks_created={stats['tasks_created']} polls={stats['polls']} "
          f"batch_polls={stats['batch_polls']} max_requests_in_1s={stats['max_requests_in_1s']}")
    verdict = "OK" if isinstance(rps, int) and rps >= TARGET_RPS else "BELOW TARGET"
    print(f"target >= {TARGET_RPS} requests/s: {verdict}")
    sys.exit(0 if verdict == "OK" else 1)


if __name__ == "__main__":
    main()
