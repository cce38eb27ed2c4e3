"""Sharing one job between runners: each runner's share of the API budget, and who may write the outputs.

`--rate` is the budget of the API key, not of one process: the runners of a shared job (PostgreSQL store)
split it evenly between the runners that are live right now, recomputed on every heartbeat, so a runner
that dies or stops returns its share within one lease. `rate_share()` is the rule, as a pure function.

How a share is enforced: the rate controller of issue 12 exposes `set_ceiling(per_second)`; when the
limiter has it, the share is its ceiling (and the adaptive control works below it). Until then,
`ShareLimiter` sits in front of the run's limiter with one `aiolimiter.AsyncLimiter` sized to the whole
budget, and makes each request cost as many units as there are live runners — the same "costlier
requests, one bucket" idea as engine/ratelimit.py, so a change of share never swaps a bucket and never
lets a burst through: each runner sends at most rate/N per second plus a burst of 1/N second's worth,
so all of them together stay within the rate plus its burst.

Outputs: several hosts can only share a job whose output folder they all see. Object storage is another
issue; until then `output_conflict()` refuses a runner on a local folder when a live runner on another
host already works on the job.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiolimiter import AsyncLimiter

from batchgen.store.records import RunnerInfo

# File systems that several hosts can mount (/proc/self/mounts type names).
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "fuse.glusterfs",
                                 "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "9p", "lustre", "gpfs", "beegfs",
                                 "fuse.juicefs", "efs"})


def rate_share(per_second: float, live_runners: int) -> float:
    """One runner's share of a key's budget: an even split between the live runners (at least one)."""
    return per_second / max(1, live_runners)


class ShareLimiter:
    """A runner's share of a shared budget, in front of its own limiter (see the module docstring).

    `acquire()` pays `runners` units of a bucket that leaks at the whole budget, then the inner limiter's
    own acquire; `penalize`/`reward` and everything else go to the inner limiter."""

    def __init__(self, inner: Any, per_second: float, runners: int = 1) -> None:
        self.inner = inner
        self._capacity = max(1.0, per_second)  # one second's worth of the whole budget, at least one request
        self._bucket = AsyncLimiter(self._capacity, self._capacity / per_second)
        self.runners = max(1, runners)
        self._paying: asyncio.Lock | None = None
        self._primed = False

    def set_runners(self, runners: int) -> None:
        self.runners = max(1, runners)

    async def acquire(self, lane: str = "submit") -> None:
        if self._paying is None:
            self._paying = asyncio.Lock()
        async with self._paying:  # one request pays at a time, first come first served
            if not self._primed:
                # A runner joining a job starts with a full bucket instead of a burst: the runners already
                # sending learn of it only at their next heartbeat, so its burst would come on top of theirs.
                self._primed = True
                await self._pay(self._capacity)
            await self._pay(float(self.runners))
        await self.inner.acquire(lane=lane)

    async def _pay(self, cost: float) -> None:
        while cost > 1e-9:
            chunk = min(cost, self._bucket.max_rate)
            await self._bucket.acquire(chunk)
            cost -= chunk

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def apply_share(limiter: Any, per_second: float, runners: int) -> None:
    """Set this runner's share: the limiter's own ceiling when it has one (issue 12), else the gate's."""
    inner = limiter.inner if isinstance(limiter, ShareLimiter) else limiter
    set_ceiling = getattr(inner, "set_ceiling", None)
    if callable(set_ceiling):
        set_ceiling(rate_share(per_second, runners))
        if isinstance(limiter, ShareLimiter):
            limiter.set_runners(1)
    elif isinstance(limiter, ShareLimiter):
        limiter.set_runners(runners)


def is_network_filesystem(path: Path) -> bool:
    """True when `path` lives on a file system other hosts can mount (by the longest matching mount)."""
    try:
        target = os.path.realpath(path if path.exists() else path.parent)
        best, fstype = "", ""
        with open("/proc/self/mounts", encoding="utf-8") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 3:
                    mount = parts[1].replace("\\040", " ")
                    inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                    if inside and len(mount) > len(best):
                        best, fstype = mount, parts[2]
        return fstype in NETWORK_FILESYSTEMS
    except OSError:
        return False


def output_conflict(out_dir: Path, host: str, others: Sequence[RunnerInfo],
                    shared_fs: bool | None = None) -> str | None:
    """Why this runner must not write `out_dir` (None when it may): another live runner of the job runs on
    a different host, and the folder is local to this one, so the job's images would be split between
    hosts and neither export nor report could find them all."""
    remote = sorted({r.host for r in others if r.host != host})
    if not remote:
        return None
    if shared_fs is None:
        shared_fs = is_network_filesystem(out_dir)
    if shared_fs:
        return None
    return (f"the output folder {out_dir} is on a local disk of {host}, but this job is already being run on "
            f"{', '.join(remote)}: runners on several hosts must write to shared storage (a network file "
            "system mounted at the same path on every host) so that every image lands in one place; run "
            "this host's runner with --out on shared storage, or run the job from one host")
