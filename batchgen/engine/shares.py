"""Sharing one job between runners: each runner's share of the API budget, and who may write the outputs.

`--rate` is the budget of the API key, not of one process: the runners of a shared job (PostgreSQL store)
split it evenly between the runners that are live right now, recomputed on every heartbeat, so a runner
that dies or stops returns its share within one lease. `rate_share()` is the rule, as a pure function.

How a share is enforced: it is the ceiling of each key's rate controller (`set_ceiling(per_second)`,
engine/ratelimit.py); the adaptive control works below it, and the controller paces evenly from its
first call with a burst of a few calls, so a runner joining the job adds no spike.

Outputs: several hosts can only share a job whose output folder they all see. Object storage is another
issue; until then `output_conflict()` refuses a runner on a local folder when a live runner on another
host already works on the job.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from batchgen.store.records import RunnerInfo

# File systems that several hosts can mount (/proc/self/mounts type names).
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "fuse.glusterfs",
                                 "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "9p", "lustre", "gpfs", "beegfs",
                                 "fuse.juicefs", "efs"})


def rate_share(per_second: float, live_runners: int) -> float:
    """One runner's share of a key's budget: an even split between the live runners (at least one)."""
    return per_second / max(1, live_runners)


def apply_share(limiter: Any, per_second: float, runners: int) -> None:
    """Set this runner's share of a key's budget as that key's rate controller's ceiling."""
    limiter.set_ceiling(rate_share(per_second, runners))


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
