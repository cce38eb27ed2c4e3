"""The way out for tasks only a lost key may look at (`batchgen retry --abandon-tasks-of-key KEY`).

A task belongs to the account that made it, so a run never polls a revoked (or missing) key's tasks with
another key, nor sends them again: it leaves them open and exits 3 (`key_missing`), waiting for a run that
has the key (docs/keys.md). When the key will never work again, that wait never ends. Giving the tasks up
and submitting their requests again with other keys may pay for them twice, so it is only ever the user's
explicit choice, made here, and never something a run does by itself.

A key is named as the run and `status` name it: its label or its fingerprint. The attempts are kept as
`abandoned` with their task ids (a task id the API returned is never forgotten), and what they may cost
stays counted as spent under --max-credits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from batchgen.errors import ConfigError
from batchgen.store.base import BaseStore

ABANDONED_CODE = "key_abandoned"


@dataclass(frozen=True)
class AbandonedTasks:
    requeued: int  # requests pending again
    keys: list[str]  # the keys' names, as given


def abandon_tasks_of_keys(store: BaseStore, names: Sequence[str]) -> AbandonedTasks:
    """Abandon the open tasks of the keys named (label or fingerprint) and requeue their requests.

    On a SQLite file this takes the run lock first (StoreLockedError, exit 3, while a run holds it): a run
    may be polling those very tasks. A shared store leaves alone the requests a live runner holds."""
    fps = resolve_keys(store, names)
    if not store.shared:
        store.runners.lock()
    message = (f"given up with `batchgen retry --abandon-tasks-of-key` (key {', '.join(names)} lost); "
               "submitted again with the keys of the next run")
    return AbandonedTasks(store.abandon_tasks_of(fps, ABANDONED_CODE, message), list(names))


def resolve_keys(store: BaseStore, names: Sequence[str]) -> list[str]:
    """The fingerprints the names stand for; a name that is no key of this job, or a label two keys have
    had, is bad input (nothing is changed)."""
    usage = store.key_states.usage()
    fps: list[str] = []
    problems: list[str] = []
    for name in names:
        found = [k["fingerprint"] for k in usage if name in (k["fingerprint"], k["label"])]
        if len(found) == 1:
            fps.append(found[0])
        elif found:
            problems.append(f"the label {name!r} names several keys ({', '.join(found)}): give the fingerprint")
        else:
            known = ", ".join(f"{k['label']} ({k['fingerprint']})" if k["label"] else k["fingerprint"]
                              for k in usage) or "none"
            problems.append(f"{name!r} is no key of this job (its keys: {known})")
    if problems:
        raise ConfigError("; ".join(problems) + "; nothing was changed")
    return fps
