"""Scenario 3 — the runner's own cost: CPU time per image and peak memory, with the API out of the way.

A batch runner should be limited by the API, never by itself. To see its own cost, take the API's limits
away: the emulator has no rate limit and every task takes 50 ms (`latency_s` at a tiny time scale), and the
runner gets `--rate 100000/s` and `--concurrency 1000`. N = 20,000 one-image requests (`--quick`: 2,000),
each submitted, polled (in batches), downloaded, checked, written to disk and recorded — the whole life of
an image.

The figure is the user + sys CPU time of the `batchgen run` process alone (`os.wait4` on that child; the
emulator is another process on the other core), divided by N. It includes interpreter start-up, the
manifest expansion into the store and the export at the end, so it is what a user pays. Target: at most
1 ms of CPU per image. Peak memory is the child's `ru_maxrss`.

Two more figures say how much of it is the machine's rather than batchgen's:
* the same run with the images written to a tmpfs (`/dev/shm`, when there is one): the runner's cost
  without the kernel's cost of creating files on the output disk;
* that kernel cost on its own: the system CPU time of creating, writing and renaming N small files in the
  work folder, as `storage/local.py` does for each image of an SQLite job (no fsync per image:
  docs/run-engine.md, *Durability*), with nothing else around it.

Each run's folder is a fresh one that the file system places in a block group of its own (ext4's top-directory
flag on the scenario's folder, `harness.spread_subfolders`), as a user's long-lived output folder is. Without
it, on ext4 with no journal, the runs pay the kernel's cost of the images that earlier runs or an earlier pass
just deleted nearby (up to 0.3 ms of system CPU per file): that cost is reported apart, by a third set of runs
whose images go into a folder just emptied of the N images of a disk run, as `rm -rf out` before a run does.

For reference, a second run of the same command on the finished job (nothing left to do) gives the fixed
cost of a run: start-up, the fingerprint check and the end-of-run export of the whole job (most of it);
it is reported, not subtracted.

Two floors say what the libraries under the engine cost on their own, with no engine around them, so that
the engine's own share can be read off (the tmpfs figure less the floors and the fixed cost's share):
* HTTP alone: batchgen's API client (aiohttp, the runner's 100 connections) submitting N tasks, polling
  them in batches of 50 until done and downloading the N images, in this benchmark's process;
* the checks alone: identifying and checking one emulator image (`inspect_image`, `quality.check_bytes`:
  Pillow's decode, the blank and aspect checks, the hash), N times.
"""

from __future__ import annotations

import asyncio
import os
import resource
import secrets
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from batchgen.api.client import EvolinkClient
from batchgen.engine import quality
from batchgen.models import QualitySettings
from batchgen.storage.local import write_atomic
from batchgen.storage.outputs import inspect_image
from benchmarks.harness import (
    API_KEY,
    FAST_MODEL,
    Row,
    check,
    emulator,
    fresh_dir,
    median,
    run_batchgen,
    spread_subfolders,
    write_csv,
)

TIME_SCALE = 0.001
LATENCY_EMULATED_S = 50.0  # x 0.001 = 50 ms of real time per task
TARGET_MS = 1.0
TMPFS = Path("/dev/shm")


def one_run(workdir: Path, n: int, out: Path | None = None) -> dict[str, float]:
    fresh_dir(workdir)
    if out is not None:
        fresh_dir(out)
    manifest = write_csv(workdir / "cost.csv", n)
    try:
        with emulator(workdir, time_scale=TIME_SCALE, seed=3, scenario={"latency_s": LATENCY_EMULATED_S}) as emu:
            result = check(run_batchgen(manifest, emu, workdir, rate="100000/s", concurrency=1000,
                                        time_scale=TIME_SCALE, timeout_s=600, out=out), "batchgen run")
            again = check(run_batchgen(manifest, emu, workdir, rate="100000/s", concurrency=1000,
                                       time_scale=TIME_SCALE, timeout_s=120, out=out), "batchgen run (nothing left)")
    finally:
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)
    return {"cpu_ms": 1000 * result.cpu_s / n, "user_ms": 1000 * result.user_s / n,
            "sys_ms": 1000 * result.sys_s / n, "rss_mb": result.max_rss_mb, "wall_s": result.wall_s,
            "fixed_cpu_s": again.cpu_s, "fixed_rss_mb": again.max_rss_mb}


def file_creation_sys_ms(folder: Path, n: int) -> float:
    """System CPU per file of the local storage's own write for an SQLite job (`write_atomic` without the
    fsync: a hidden .part, a small image's worth of bytes, rename into place), alone, in `folder`."""
    fresh_dir(folder)
    data = os.urandom(600)  # about the size of an emulator image
    before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    for i in range(n):
        write_atomic(folder / f"img{i}.png", data, make_parent=False, durable=False)
    spent = resource.getrusage(resource.RUSAGE_SELF).ru_stime - before
    shutil.rmtree(folder, ignore_errors=True)
    return 1000 * spent / n


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _http_alone(base_url: str, n: int) -> tuple[float, bytes]:
    """CPU seconds of the client's part of N images (submit, batched polls, download), and one image."""
    async with EvolinkClient(base_url, base_url, API_KEY) as client:

        async def each(jobs: list[Any], call: Callable[[Any], Awaitable[Any]]) -> list[Any]:
            # As many under way at once as the cost run's --concurrency, like the runner (not N coroutines).
            results: list[Any] = [None] * len(jobs)
            at = iter(range(len(jobs)))

            async def worker() -> None:
                for i in at:
                    results[i] = await call(jobs[i])

            await asyncio.gather(*(worker() for _ in range(min(1000, len(jobs)))))
            return results

        async def submit(i: int) -> str:
            body = {"model": FAST_MODEL, "prompt": f"Studio photo of product {i} (floor)", "size": "1:1"}
            return (await client.submit(body)).id

        async def download(url: str) -> bytes:
            return (await client.download(url)).data

        start = _cpu_s()
        ids = await each(list(range(n)), submit)
        urls: dict[str, str] = {}
        final: set[str] = set()  # a failed task is final too: it must not be polled forever
        left = ids
        while left:
            await asyncio.sleep(0.02)
            for first in range(0, len(left), 50):
                for task_id, snap in (await client.get_tasks(left[first:first + 50])).items():
                    if snap.final:
                        final.add(task_id)
                        if snap.status == "completed" and snap.results:
                            urls[task_id] = snap.results[0]
            left = [t for t in left if t not in final]
        images = await each(list(urls.values()), download)
        return _cpu_s() - start, images[0]


def floors_ms(workdir: Path, n: int) -> tuple[float, float]:
    """(HTTP alone, the checks alone), CPU ms per image, measured in this process."""
    fresh_dir(workdir)
    with emulator(workdir, time_scale=TIME_SCALE, seed=3, scenario={"latency_s": LATENCY_EMULATED_S}) as emu:
        http_s, image = asyncio.run(_http_alone(emu.base_url, n))
    settings = QualitySettings()
    start = _cpu_s()
    for _ in range(n):
        inspect_image(image)
        quality.check_bytes(image, "1:1", settings)
    return 1000 * http_s / n, 1000 * (_cpu_s() - start) / n


def run(workdir: Path, *, quick: bool, runs: int) -> list[Row]:
    n = 2000 if quick else 20_000
    spread = spread_subfolders(fresh_dir(workdir))
    # ext4 picks a spread folder's block group from a hash of its name: a name of this pass's own keeps
    # it away from the groups where an earlier pass's folders of the same name were deleted.
    tag = secrets.token_hex(4)
    results = [one_run(workdir / f"run{i}-{tag}", n) for i in range(runs)]
    tmpfs = TMPFS.is_dir() and os.access(TMPFS, os.W_OK)
    in_memory = [one_run(workdir / f"mem{i}-{tag}", n, out=TMPFS / f"batchgen-bench-{os.getpid()}-{i}")
                 for i in range(runs)] if tmpfs else []
    # What `rm -rf out` right before a run costs on such a disk: the images go where N were just deleted.
    emptied = [one_run(workdir / f"redo{i}-{tag}", n, out=workdir / f"run{i}-{tag}" / "out") for i in range(runs)]
    floor = [file_creation_sys_ms(workdir / f"files{i}-{tag}", n) for i in range(runs)]
    http, checks = zip(*(floors_ms(workdir / f"floor{i}-{tag}", n) for i in range(runs)), strict=True)

    def col(rows: list[dict[str, float]], name: str) -> list[float]:
        return [r[name] for r in rows]

    cpu = median(col(results, "cpu_ms"))
    out = [
        Row("3 runner cost", f"CPU per image, N={n:,}", cpu, "ms", f"<= {TARGET_MS:g} ms", cpu <= TARGET_MS,
            bound=f"{TARGET_MS:g} ms", ratio=TARGET_MS / cpu, runs=col(results, "cpu_ms"),
            note=f"user {median(col(results, 'user_ms')):.2f} + sys {median(col(results, 'sys_ms')):.2f} ms; "
                 f"{n / median(col(results, 'wall_s')):.0f} images/s; "
                 f"a run with nothing left: {median(col(results, 'fixed_cpu_s')):.2f} s CPU"
                 + ("" if spread else "; run folders not spread over block groups (not ext4)")),
    ]
    if in_memory:
        mem = median(col(in_memory, "cpu_ms"))
        out.append(Row("3 runner cost", f"CPU per image, N={n:,}, images on tmpfs", mem, "ms", "", None,
                       runs=col(in_memory, "cpu_ms"),
                       note=f"user {median(col(in_memory, 'user_ms')):.2f} + sys "
                            f"{median(col(in_memory, 'sys_ms')):.2f} ms: the same run without the output "
                            "disk's file-creation cost"))
    just_emptied = median(col(emptied, "cpu_ms"))
    out.append(Row("3 runner cost", f"CPU per image, N={n:,}, into a folder whose {n:,} images were just deleted",
                   just_emptied, "ms", "", None, runs=col(emptied, "cpu_ms"),
                   note=f"user {median(col(emptied, 'user_ms')):.2f} + sys {median(col(emptied, 'sys_ms')):.2f} ms: "
                        "the kernel's cost of not reusing inodes freed moments ago, beside the runner's"))
    out += [
        Row("3 runner cost", "sys CPU per file, creating files on the work folder's disk", median(floor), "ms",
            "", None, runs=floor, note="create + write + rename alone: the kernel's share of each image"),
        Row("3 runner cost", "CPU per image of the HTTP alone (submit, batched polls, download)", median(http),
            "ms", "", None, runs=list(http), note="batchgen's API client with no engine around it: aiohttp's floor"),
        Row("3 runner cost", "CPU per image of the checks alone (identify, decode, check, hash)", median(checks),
            "ms", "", None, runs=list(checks), note="Pillow's floor for an emulator image"),
        Row("3 runner cost", f"peak memory, N={n:,}", median(col(results, "rss_mb")), "MB", "", None,
            runs=col(results, "rss_mb"),
            note=f"a run with nothing left: {median(col(results, 'fixed_rss_mb')):.0f} MB"),
    ]
    return out
