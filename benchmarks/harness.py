"""Shared plumbing for the benchmarks: the emulator in its own process, batchgen as a measured child.

Why separate processes: the issue asks for the *runner's own* CPU time and memory. If the emulator ran in
the runner's process (as `batchgen run --emulator` does) its request handling would be billed to batchgen.
So the emulator is `python -m batchgen emulator --port 0` (it prints its URL on one line), and batchgen is
`python -m batchgen run ...` pointed at it through `EVOLINK_API_BASE`/`EVOLINK_FILES_BASE`; the child is
reaped with `os.wait4`, which returns exactly that child's user+sys CPU time and peak RSS. On the 2-core
machine the benchmarks were written for, the emulator and the runner each get one core.

Everything talks to 127.0.0.1 only, every wait is bounded, and every process started here is killed by
the code that started it (context managers), so a failed benchmark never leaves a server behind.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import os
import platform
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
# Before/after figures: BENCH_RUNNER_SRC=<a checkout of another commit> runs *that* batchgen as the measured
# runner (`git archive <commit> | tar -x -C DIR`), while the emulator and the benchmarks stay this tree's.
RUNNER_SRC = Path(os.environ["BENCH_RUNNER_SRC"]).resolve() if os.environ.get("BENCH_RUNNER_SRC") else None
API_KEY = "sk-evo-bench"
# A cheap, fast model: its latency distribution is the emulator's shortest (median 5 s emulated).
FAST_MODEL = "z-image-turbo"


# --- the emulator ----------------------------------------------------------------------------------


@dataclass
class EmulatorProcess:
    """A running `batchgen emulator` child and the URL it printed."""

    process: subprocess.Popen[str]
    base_url: str

    def get(self, path: str, timeout_s: float = 30.0) -> Any:
        with urllib.request.urlopen(self.base_url + path, timeout=timeout_s) as response:
            return json.loads(response.read())

    def stats(self) -> dict[str, Any]:
        """GET /_emulator/stats (counters: requests by route and status, polls, 429s, ...)."""
        return dict(self.get("/_emulator/stats"))

    def tasks(self) -> list[dict[str, Any]]:
        """GET /_emulator/tasks: every task with its wall-clock `created` time."""
        return list(self.get("/_emulator/tasks", timeout_s=120.0)["data"])

    def env(self) -> dict[str, str]:
        """The environment that points a batchgen child at this emulator."""
        env = dict(os.environ)
        for name in list(env):
            if name.startswith(("EVOLINK_", "BATCHGEN_")):
                del env[name]
        env.update(EVOLINK_API_BASE=self.base_url, EVOLINK_FILES_BASE=self.base_url, EVOLINK_API_KEY=API_KEY)
        return env


@contextlib.contextmanager
def emulator(workdir: Path, *, rate_limit: float | None = None, time_scale: float = 1.0, seed: int = 1,
             scenario: dict[str, Any] | None = None) -> Iterator[EmulatorProcess]:
    """Start the emulator in its own process (scenario = EmulatorConfig fields as YAML) and stop it after."""
    cmd = [sys.executable, "-m", "batchgen", "emulator", "--host", "127.0.0.1", "--port", "0",
           "--time-scale", repr(time_scale), "--seed", str(seed)]
    if rate_limit is not None:
        cmd += ["--rate-limit", repr(rate_limit)]
    if scenario:
        path = workdir / f"scenario-{time.monotonic_ns()}.yaml"
        path.write_text(yaml.safe_dump(scenario), encoding="utf-8")
        cmd += ["--scenario", str(path)]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = process.stdout.readline() if process.stdout else ""
        if "listening on" not in line:
            raise RuntimeError(f"the emulator did not start: {line!r}")
        yield EmulatorProcess(process, line.rsplit(" ", 1)[-1].strip())
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- measured children -----------------------------------------------------------------------------


@dataclass
class ChildResult:
    """What one measured child did: exit code, times, and its own rusage (not its parent's, not siblings')."""

    returncode: int
    started_wall: float  # time.time() just before the fork
    wall_s: float
    user_s: float
    sys_s: float
    max_rss_mb: float  # the child's own peak resident size (VmHWM), see run_child
    stdout: str
    stderr: str

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    def events(self) -> list[dict[str, Any]]:
        """The `--json` events on stdout (lines that are not JSON are skipped)."""
        out = []
        for line in self.stdout.splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def summary(self) -> dict[str, Any]:
        for event in reversed(self.events()):
            if event.get("event") == "summary":
                return event
        return {}


def run_child(cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path = REPO,
              timeout_s: float = 600.0, workdir: Path | None = None, src: Path | None = None) -> ChildResult:
    """Run `cmd` to completion and return its own CPU time (`os.wait4`) and peak memory.

    CPU: user + sys of that child alone, from wait4. Peak memory: a Python child (`python -m ...` or
    `python -c ...`) runs under `benchmarks.peak`, which records its own VmHWM at exit, because a child's
    `ru_maxrss` starts from this process's size at fork (see peak.py); other commands fall back to
    `ru_maxrss`. `src`: import batchgen from this tree instead (see RUNNER_SRC). Output goes to files, not
    pipes, so a chatty child can never block on a full pipe while
    we wait. A child still running after `timeout_s` is killed and reported with returncode -9; a child is
    never left behind if this process is interrupted.
    """
    tmp = workdir or Path(os.environ.get("TMPDIR", "/tmp"))
    stamp = time.monotonic_ns()
    out_path, err_path = tmp / f"child-{stamp}.out", tmp / f"child-{stamp}.err"
    peak_path = tmp / f"child-{stamp}.peak"
    argv = list(cmd)
    if len(argv) > 2 and argv[0] == sys.executable and argv[1] in ("-m", "-c"):
        byte_compile(src or REPO)
        argv = [sys.executable, "-m", "benchmarks.peak", str(peak_path), *argv[1:]]
        env = dict(env if env is not None else os.environ)
        first = [str(src)] if src is not None else []
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [*first, str(REPO), env.get("PYTHONPATH", "")]))
    with out_path.open("w") as out, err_path.open("w") as err:
        started_wall = time.time()
        started = time.monotonic()
        process = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=cwd)
        deadline = started + timeout_s
        try:
            while True:
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    process.kill()
                    pid, status, usage = os.wait4(process.pid, 0)
                    status = -9 << 8 if os.WIFSIGNALED(status) else status
                    break
                time.sleep(0.01)
        except BaseException:
            process.kill()
            process.wait()
            raise
        wall_s = time.monotonic() - started
        process.returncode = 0  # reaped by wait4; keep Popen from trying again
    code = os.waitstatus_to_exitcode(status) if status >= 0 else -9
    peak_kb = 0
    with contextlib.suppress(OSError, ValueError):
        peak_kb = int(peak_path.read_text())
    result = ChildResult(returncode=code, started_wall=started_wall, wall_s=wall_s, user_s=usage.ru_utime,
                         sys_s=usage.ru_stime, max_rss_mb=(peak_kb or usage.ru_maxrss) / 1024.0,
                         stdout=out_path.read_text(errors="replace"), stderr=err_path.read_text(errors="replace"))
    for path in (out_path, err_path, peak_path):
        path.unlink(missing_ok=True)
    return result


_COMPILED: set[Path] = set()


def byte_compile(tree: Path) -> None:
    """Write the bytecode of `tree`'s batchgen package once, as an installed package has it.

    A user's first run writes `__pycache__` and every later run loads it. With PYTHONDONTWRITEBYTECODE set
    (some sandboxes and containers set it) nothing is ever cached, and every measured run would also pay
    for compiling batchgen from source: about 0.1 s of CPU per run on the 2-core machine, 0.05 ms per image
    at N=2,000. `compileall` writes the cache whatever that variable says, and loading it needs no write.
    """
    if tree in _COMPILED:
        return
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "batchgen")], check=True,
                   stdout=subprocess.DEVNULL)
    _COMPILED.add(tree)


def batchgen_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "batchgen", *args]


def run_batchgen(manifest: Path, emu: EmulatorProcess, workdir: Path, *, rate: str | None = None,
                 concurrency: int | None = None, time_scale: float = 1.0, db: Path | None = None,
                 timeout_s: float = 900.0, extra: Sequence[str] = (), out: Path | None = None) -> ChildResult:
    """`batchgen run MANIFEST --json` against the emulator process, measured (images in `out`, default
    workdir/out)."""
    cmd = batchgen_cmd("run", str(manifest), "--db", str(db or workdir / "state.db"),
                       "--out", str(out or workdir / "out"), "--time-scale", repr(time_scale), "--json", *extra)
    if rate is not None:
        cmd += ["--rate", rate]
    if concurrency is not None:
        cmd += ["--concurrency", str(concurrency)]
    return run_child(cmd, env=emu.env(), timeout_s=timeout_s, workdir=workdir, cwd=RUNNER_SRC or REPO,
                     src=RUNNER_SRC)


def check(result: ChildResult, what: str, ok: Sequence[int] = (0,)) -> ChildResult:
    """Raise with the child's stderr tail when it did not end as expected (a benchmark of a failure is noise)."""
    if result.returncode not in ok:
        tail = (result.stderr or result.stdout)[-2000:]
        raise RuntimeError(f"{what} exited {result.returncode}:\n{tail}")
    return result


# --- inputs ----------------------------------------------------------------------------------------


def fresh_dir(path: Path) -> Path:
    """An empty directory: a run must never resume a previous run's store (with --workdir it could)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_TOPDIR_FL = 0x00020000  # chattr +T


def spread_subfolders(path: Path) -> bool:
    """Ask the file system to give each new subfolder of `path` a block group of its own (ext4's "top of a
    directory hierarchy" flag, `chattr +T`); False where it cannot (tmpfs, another file system, no right).

    Why: ext4 without a journal (this VM's disk) will not reuse an inode freed in the last minute or more,
    and checks every such inode on each file it creates in that block group. A folder placed beside the
    thousands of images an earlier run or pass just deleted then pays up to 0.3 ms of system CPU per new
    file (perf: `find_inode_bit` -> `recently_deleted`), a cost of the benchmark's own clean-up, not of
    the runner. A user's output folder, where images accumulate, does not pay it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, struct.pack("i", 0)))[0]
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("i", flags | _FS_TOPDIR_FL))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def write_csv(path: Path, rows: int, *, model: str = FAST_MODEL, size: str = "1:1", tag: str = "bench") -> Path:
    """A direct CSV job: one request per row, unique prompts (so unique request keys), one image each.

    Columns: id, prompt, model, size and two metadata columns, about what a catalogue export looks like.
    """
    sizes = ("1:1", "4:3", "16:9", "3:4") if size == "mixed" else (size,)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "prompt", "model", "size", "category", "price"])
        for i in range(rows):
            writer.writerow([f"{tag}-{i:07d}", f"Studio photo of product {i} ({tag}), plain background, soft light",
                             model, sizes[i % len(sizes)], ("kitchen", "home", "garden")[i % 3], f"{(i % 97) + 0.5}"])
    return path


# --- numbers ---------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


@dataclass
class Row:
    """One line of the results table; `ratio` is figure/limit oriented so that >= 1 means on target."""

    scenario: str
    figure: str
    value: float
    unit: str
    target: str
    passed: bool | None  # None: reported, no target
    bound: str = ""
    ratio: float | None = None
    note: str = ""
    runs: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "figure": self.figure, "value": self.value, "unit": self.unit,
                "bound": self.bound, "ratio": self.ratio, "target": self.target, "passed": self.passed,
                "note": self.note, "runs": self.runs}


def fmt(value: float, unit: str = "") -> str:
    if value != value:  # NaN
        return "-"
    if abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif abs(value) >= 100:
        text = f"{value:.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".strip()


def machine() -> dict[str, str]:
    """Where the figures were taken: cores, memory, Python, SQLite, date."""
    import sqlite3

    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {"nproc": str(os.cpu_count()), "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
            "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
