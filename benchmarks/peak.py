"""Run a Python child like `python -m MODULE ...` or `python -c CODE ...`, and record its own peak memory.

Why not `ru_maxrss`: on Linux a child's `ru_maxrss` starts from its parent's resident size at fork and
survives the exec, so every child of a 60 MB benchmark process would report at least 60 MB however small
it really is. `VmHWM` in /proc/self/status is the high-water mark of the memory map created by the exec,
i.e. of the child alone; it is read at interpreter exit (atexit runs on a normal return and on
`sys.exit`) and written to the file named by the first argument.

    python -m benchmarks.peak OUT_FILE -m batchgen run ...
    python -m benchmarks.peak OUT_FILE -c "code" args...
"""

from __future__ import annotations

import atexit
import runpy
import sys
from pathlib import Path


def vm_hwm_kb() -> int:
    """This process's peak resident set size in kB (0 where /proc is not available)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] not in ("-m", "-c"):
        raise SystemExit("usage: python -m benchmarks.peak OUT_FILE (-m MODULE | -c CODE) [ARGS...]")
    out, mode, target, rest = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
    atexit.register(lambda: out.write_text(str(vm_hwm_kb())))
    if mode == "-m":
        sys.argv = [target, *rest]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.argv = ["-c", *rest]
        exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})


if __name__ == "__main__":
    main()
