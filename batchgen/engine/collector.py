"""How Python's garbage collector runs while a run's engine runs: seldom, and past the objects that live
for the whole run.

A run allocates hundreds of short-lived objects per image (requests and responses, JSON documents,
records). With CPython's default thresholds the collector ran about 330 times in a 2,000-image run, and
its two full collections each walked every object of the 400-odd modules a run imports: 140-190 ms of
CPU in all, 5-7% of the run (measured with `gc.callbacks`; issue 12, docs/benchmarks.md). Reference
counting frees almost all of those objects at once; the collector only finds cycles, and a cycle can wait a
little longer. So, for the length of the run:

* what exists when the engine starts (modules, classes, the settings, the store) is moved out of the
  collector's sight (`gc.freeze`): it lives for the whole run anyway;
* the youngest generation is collected every GEN0_THRESHOLD allocations instead of every 700.

Both are undone when the run ends, so a program that runs the engine as a library gets its own settings
back. The `batchgen run` command, a process that exists for one run, also calls `tune_process` at its
start: the imports and the manifest's sync into the store collect seldom too, and the interpreter's last
full collection at exit, which walks every object only to find that nothing is left to do, is skipped.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
from collections.abc import Iterator

GEN0_THRESHOLD = 10_000

_depth = 0  # runs in progress in this process: only the outermost one changes and restores the settings
_saved: tuple[int, int, int] | None = None


@contextlib.contextmanager
def seldom_collections() -> Iterator[None]:
    """Fewer collections, none over the objects that exist now, until the block ends."""
    global _depth, _saved
    if _depth == 0:
        _saved = gc.get_threshold()
        gc.freeze()
        if _saved[0] != 0:  # 0: the program switched collection off; leave it off
            gc.set_threshold(max(GEN0_THRESHOLD, _saved[0]), _saved[1], _saved[2])
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _saved is not None:
            gc.set_threshold(*_saved)
            gc.unfreeze()
            _saved = None


def tune_process() -> None:
    """For a process that runs one job and ends: seldom collections from now on, none at exit."""
    threshold = gc.get_threshold()
    if threshold[0] != 0:
        gc.set_threshold(max(GEN0_THRESHOLD, threshold[0]), threshold[1], threshold[2])
    # atexit runs before the interpreter's last collection; frozen objects are not walked by it. Files and
    # connections are closed by the code that opened them, so no finalizer is left for that walk to run.
    atexit.unregister(gc.freeze)  # once, however many runs a process starts (tests invoke the CLI in-process)
    atexit.register(gc.freeze)
