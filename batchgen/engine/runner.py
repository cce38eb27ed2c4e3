"""`batchgen run`: one job, from manifest to images on disk, resumable — the wiring around the scheduler.

`run_job` opens the store and takes its lock (a second run on the same database exits 3 naming the
holder), syncs the manifest into it (bad input raises ManifestError before anything is sent: exit 2), then
runs the scheduler in a fresh event loop against the real API or the built-in emulator, with signal
handlers that only set a flag. The run's keys (one from EVOLINK_API_KEY, or several from EVOLINK_API_KEYS or
--keys-file) become a `KeyPool` (keypool.py): a client, limiter, balance check and uploader per key. It
owns the policy around the run: the settings (CLI flag over manifest over
default), the credit preflight, the runtime limit's deadlines, the exit code and the summary.

Exit codes: 0 every request done; 1 finished but some failed for good; 2 bad input (raised, mapped by the
CLI); 3 stopped early and resumable (signal, budget, runtime limit, 401/402, API unreachable, policy pause,
tasks left past max_wait, database locked).

Shared store (`--db postgresql://...`, docs/scale-out.md): `store.runners.lock()` registers this process as one of the
job's runners instead of taking a file lock; the run prints which runners it shares the job with, refuses
a local output folder when another host already runs the job, takes its share of `--rate` (re-read every
heartbeat), and counts `--max-runtime` from the job-wide start of the current group of runners.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from batchgen import catalog
from batchgen.engine import collector, shares
from batchgen.engine.keyfile import KeySource, load_keys
from batchgen.engine.keypool import KeyPool, KeyState, PooledKey, refusal_state
from batchgen.engine.names import restore_names
from batchgen.engine.progress import Progress
from batchgen.engine.recovery import images_durable, reopen_lost_images
from batchgen.engine.rejects import requeue_rejected
from batchgen.engine.runstate import StopReason
from batchgen.engine.scheduler import HALT_GRACE_S, Scheduler, SchedulerConfig
from batchgen.engine.uploads import Uploader
from batchgen.errors import ApiError, BatchgenError, ConfigError, ConnectError, LocalFaultError, ManifestError
from batchgen.models import JobSpec, RunOptions, RunSettings
from batchgen.storage.base import Storage
from batchgen.storage.location import check_output_move, open_storage, output_move, record_storage, resolve_location
from batchgen.store.base import BaseStore as Store
from batchgen.store.open import open_store
from batchgen.units import credits_text, parse_duration_s, parse_rate, plural

DEFAULT_API_BASE = "https://api.evolink.ai"
DEFAULT_FILES_BASE = "https://files-api.evolink.ai"
EMULATOR_KEY = "sk-evo-emulator"
EXIT_DONE, EXIT_FAILED, EXIT_STOPPED = 0, 1, 3
# Tests (and the curious) set this to make the scheduler assert its poll invariant after every change.
CHECK_INVARIANTS_ENV = "BATCHGEN_CHECK_INVARIANTS"
# A shared store's runner lease (heartbeat every third of it), scaled by --time-scale for tests.
LEASE_S = 15.0
LEASE_MIN_S = 1.5


def run_job(manifest_path: Path, options: RunOptions) -> int:
    """Run a job to completion (or a resumable stop) and return the exit code; bad input raises."""
    return asyncio.run(run_job_async(manifest_path, options))


async def run_job_async(manifest_path: Path, options: RunOptions) -> int:
    """`run_job` inside a running loop (tests run it next to an in-process emulator)."""
    from batchgen.manifest.load import open_manifest

    # Keys first: a bad keys file is exit 2 before anything is opened or changed; so is a bad scenario.
    source = load_keys(options.keys_file, options.api_keys, None if options.emulator else options.api_key)
    if options.emulator and options.emulator_scenario is not None:
        from batchgen.emulator.config import load_scenario

        load_scenario(options.emulator_scenario)
    manifest = open_manifest(Path(manifest_path))
    job = manifest.job
    db_path = Path(options.db_path) if options.db_path else job.default_db_path()
    # A folder or a bucket (s3://bucket/prefix); --out wins over the manifest's output.folder.
    try:
        out = resolve_location(options.out_dir) if options.out_dir else job.output_location()
    except ValueError as error:
        raise ConfigError(f"--out: {error}") from None
    target: str | Path = options.db_url or db_path
    job_name = options.job or (job.name if options.db_url else None)
    lease_s = max(LEASE_MIN_S, LEASE_S * options.time_scale)
    # The manifest is checked as it streams into the store (a million rows never sit in memory): a database
    # this run created for a manifest that turns out to be bad is removed again, so bad input changes nothing.
    created = isinstance(target, Path) and not target.exists()
    try:
        return await _open_and_run(manifest_path, manifest, job, options, target, job_name, lease_s, out, source)
    except _BadManifest as bad:
        if created:
            _remove_database(Path(target))
        raise bad.error from None


class _BadManifest(Exception):
    """The manifest failed its checks while it was synced into the store (nothing was sent yet)."""

    def __init__(self, error: ManifestError) -> None:
        super().__init__(str(error))
        self.error = error


def _remove_database(path: Path) -> None:
    for leftover in (path, *(path.with_name(path.name + suffix) for suffix in ("-wal", "-shm", "-journal", ".lock"))):
        with contextlib.suppress(OSError):
            leftover.unlink()


async def _open_and_run(manifest_path: Path, manifest: Any, job: JobSpec, options: RunOptions, target: str | Path,
                        job_name: str | None, lease_s: float, out: str, source: KeySource | None) -> int:
    with open_store(target, job_name, create=True, lease_s=lease_s) as store:
        store.runners.lock()
        notes = _sharing_notes(store, out)
        move = output_move(store, out)
        if move is not None:  # the images on record are elsewhere: only if they were moved here
            notes.append(await asyncio.to_thread(check_output_move, store.location, *move, out,
                                                 endpoint_url=job.output.endpoint_url, region=job.output.region))
        try:
            sync = store.sync(manifest, out)
        except ManifestError as error:
            raise _BadManifest(error) from None
        if sync.stale:
            notes.append(f"this manifest ({manifest_path}) is older than the version the job was last synced "
                         "from by another runner: it is not synced back; the job runs as the database has it")
        # Opening a bucket checks it (and creates it when missing) before anything is sent.
        try:
            patience_s: float | None = parse_duration_s(effective_settings(job, options).patience)
        except ValueError:
            patience_s = None  # reported as bad input by _run, before anything is sent
        storage = await asyncio.to_thread(open_storage, out, endpoint_url=job.output.endpoint_url,
                                          region=job.output.region, time_scale=options.time_scale,
                                          patience_s=patience_s, durable=images_durable(store))
        try:
            if out.startswith("s3://"):
                record_storage(store, job.output.endpoint_url, job.output.region)
            return await _run(store, job, options, storage, sync.added, sync.removed, notes, source)
        finally:
            await asyncio.to_thread(storage.close)


def _sharing_notes(store: Store, out: str) -> list[str]:
    """Who else runs this job (shared stores); refuses a local output folder shared across hosts (a bucket
    is shared storage: every runner may write it)."""
    if not store.shared:
        return []
    others = [r for r in store.runners.live() if r.id != store.runner_id]
    problem = None if out.startswith("s3://") else shares.output_conflict(Path(out), socket.gethostname(), others)
    if problem is not None:
        raise ConfigError(problem)
    if not others:
        return [f"running job {store.job_name} in {store.location}; no other runner shares it right now"]
    names = ", ".join(f"{r.host} pid {r.pid} (since {time.strftime('%H:%M:%S', time.localtime(r.started_at))})"
                      for r in others)
    return [f"sharing job {store.job_name} with {plural(len(others), 'other runner')}: {names}"]


def effective_settings(job: JobSpec, options: RunOptions) -> RunSettings:
    """The manifest's run settings with the CLI's flags on top."""
    updates: dict[str, Any] = {}
    if options.rate is not None:
        updates["rate"] = options.rate
    if options.concurrency is not None:
        updates["concurrency"] = options.concurrency
    if options.max_credits is not None:
        updates["max_credits"] = options.max_credits
    if options.patience is not None:
        updates["patience"] = options.patience
    return job.run.model_copy(update=updates)


async def _run(store: Store, job: JobSpec, options: RunOptions, storage: Storage, added: int, removed: int,
               notes: list[str] | None = None, source: KeySource | None = None) -> int:
    settings = effective_settings(job, options)
    try:
        rate = parse_rate(settings.rate)
        max_wait_s = parse_duration_s(settings.max_wait) * options.time_scale
        parse_duration_s(settings.patience)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    async with contextlib.AsyncExitStack() as stack:
        if options.emulator:
            from batchgen.emulator import Emulator, EmulatorConfig

            emu = await stack.enter_async_context(Emulator(EmulatorConfig.from_options(
                time_scale=options.time_scale, seed=options.emulator_seed, scenario_path=options.emulator_scenario)))
            api_base = files_base = emu.base_url
            if source is None:  # --emulator takes any key; a keys file or EVOLINK_API_KEYS tries a pool on it
                from batchgen.engine.keyfile import KeySpec

                source = KeySource([KeySpec(EMULATOR_KEY)], [], "emulator")
        else:
            api_base = options.api_base or DEFAULT_API_BASE
            files_base = options.files_base or DEFAULT_FILES_BASE
            if source is None:
                raise ConfigError("no API key: set EVOLINK_API_KEY (or EVOLINK_API_KEYS, or --keys-file), or pass "
                                  "--emulator")
        # One client and one rate controller per key; --rate / run.rate is each key's unless the file says. A
        # due poll waits at most one poll interval to fill its batch: a finished task is seen within it.
        pool = await KeyPool.open(stack, source.keys, api_base, files_base, rate,
                                  poll_grace_max_s=catalog.POLL_INTERVAL_S[0] * options.time_scale)
        if store.shared:  # one budget per key for every runner of the job: this runner takes its share
            runners = len(store.runners.live())
            for key in pool.keys:
                shares.apply_share(key.limiter, (key.spec.rate or rate).per_second, runners)
        # Everything made so far lives for the whole run: the collector skips it, and runs seldom (collector.py).
        with collector.seldom_collections():
            return await _drive(store, job, settings, options, storage, pool, max_wait_s, added, removed,
                                notes or [], source.warnings)
    raise AssertionError("unreachable")  # pragma: no cover


async def _drive(store: Store, job: JobSpec, settings: RunSettings, options: RunOptions, storage: Storage,
                 pool: KeyPool, max_wait_s: float, added: int, removed: int, notes: list[str],
                 warnings: list[str] | None = None) -> int:
    loop = asyncio.get_running_loop()
    client = pool.keys[0].client  # downloads (no key is sent) and the one-key paths
    start = loop.time()
    submit_deadline = hard_deadline = runtime_end = None
    if options.max_runtime_s is not None:
        begun = start - store.runners.elapsed_s()  # shared stores: the limit holds for the job's runners as a whole
        # Stop submitting early enough for tasks in flight to finish and download before the hard stop.
        margin = min(max_wait_s + 5.0 * options.time_scale, 0.25 * options.max_runtime_s)
        submit_deadline = begun + options.max_runtime_s - margin
        # Halt early enough that the grace given to calls under way ends at the limit, not after it.
        runtime_end = begun + options.max_runtime_s
        hard_deadline = runtime_end - min(HALT_GRACE_S, 0.1 * options.max_runtime_s)
    cfg = SchedulerConfig(
        out_dir=None, storage=storage, filename_template=job.output.filename, concurrency=settings.concurrency,
        max_attempts=settings.max_attempts, fallback_models=list(settings.fallback_models), max_wait_s=max_wait_s,
        download_concurrency=settings.download_concurrency, regenerate_expired=settings.regenerate_expired,
        policy_pause_after=settings.policy_pause_after, max_credits=settings.max_credits,
        time_scale=options.time_scale, submit_deadline=submit_deadline, hard_deadline=hard_deadline,
        runtime_end=runtime_end,
        patience_s=parse_duration_s(settings.patience), check_invariants=bool(os.environ.get(CHECK_INVARIANTS_ENV)),
        quality=job.quality)
    progress: Progress | None = None
    # Images the last run recorded but the machine going down took back: downloaded again (recovery.py).
    lost = reopen_lost_images(store, storage)
    # Rows that came back get their images' file names back from the versions that replaced them (names.py).
    restored = restore_names(store, storage) if added or removed else 0
    if restored:
        warnings = [*(warnings or []), f"{plural(restored, 'image')} of rows back in the manifest "
                    f"{'has its file name' if restored == 1 else 'have their file names'} again (the versions that "
                    "replaced them are kept in _superseded/)"]
    if lost:
        warnings = [*(warnings or []), f"the last run did not finish and {plural(len(lost), 'image')} it recorded "
                    f"{'is' if len(lost) == 1 else 'are'} not on disk whole (e.g. {lost[0]}): downloaded again"]
    # Local reference files → Files API URLs, once per content (issue 6, uploads.py).
    if options.emulator:
        # The in-process emulator's tasks die with the process that ran it: a resumed --emulator run faces a
        # fresh emulator, so the previous run's tasks are resubmitted (the emulator charges nothing).
        released = store.release_open_attempts(
            "emulator_restarted", "the previous run's emulator is gone; resubmitted to this run's emulator")
    else:
        released = 0
    for key in pool.keys:
        # Each key uploads its own files (files belong to an account); one key also owns pre-issue-15 uploads.
        key.uploader = Uploader(store, key.client, options.time_scale, key_fp=key.fingerprint, legacy=pool.single)
        store.key_states.record(key.fingerprint, key.label, KeyState.ACTIVE.value)
    uploader = pool.keys[0].uploader
    scheduler = Scheduler(store, client, cfg, emit=lambda k, f: progress.event(k, f) if progress else None,
                          prepare_body=uploader.prepare_body, reference_failed=uploader.reference_failed, pool=pool)
    # The rate controller, shown while it runs and in the summary; several keys have one each (in "keys").
    limiter = pool.keys[0].limiter if pool.single else None
    progress = Progress.for_stream(options.json_events, scheduler.counters, limiter)
    for warning in warnings or []:
        progress.event("warning", {"message": warning})
    run_id = store.run_log.start()
    if added or removed:
        progress.event("synced", {"added": added, "removed": removed,
                                  "message": f"manifest: {plural(added, 'new request')}, {removed} removed"})
    # Images rejected in `batchgen review` since the last run are generated again (issue 16, rejects.py).
    rejected = requeue_rejected(store, storage, settings.max_attempts)  # blocks briefly: the store is ours
    if rejected.requeued or rejected.exhausted:
        progress.event("review_requeued", {
            "requeued": rejected.requeued, "exhausted": rejected.exhausted,
            "message": f"review: {plural(rejected.requeued, 'rejected request')} requeued for a new attempt"
            + (f", {rejected.exhausted} left as they are (no attempts left; raise run.max_attempts)"
               if rejected.exhausted else "")})
    for note in notes:
        progress.event("runners" if not note.startswith("this manifest") else "warning", {"message": note})
    if released:
        progress.event("warning", {"message": f"{plural(released, 'request')} in flight belonged to the previous run's "
                                   "emulator, which is gone; resubmitting them"})

    signals = 0
    main_task = asyncio.current_task()

    def on_signal(signum: int) -> None:
        # Only flags: the first asks the scheduler to stop, a second one stops at once (state is committed).
        nonlocal signals
        signals += 1
        if signals == 1:
            scheduler.halt(StopReason.SIGNAL, f"stopped by {signal.Signals(signum).name}; resumable")
        elif main_task is not None:
            main_task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    ticker = asyncio.ensure_future(_tick(progress))
    sharer = asyncio.ensure_future(_share_budget(store, pool, settings)) if store.shared else None
    reason, message = StopReason.FINISHED, "finished"
    try:
        if pool.single:
            await _preflight(store, pool.keys[0], scheduler, progress)
        else:
            await _preflight_pool(store, pool, scheduler, progress)
        if scheduler.stop_state is not None:
            reason, message = scheduler.stop_state
        else:
            result = await scheduler.run()
            reason, message = result.reason, result.message
    except asyncio.CancelledError:
        reason, message = StopReason.SIGNAL, "stopped at once by a second signal; resumable"
    finally:
        ticker.cancel()
        if sharer is not None:
            sharer.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    code, summary = _finish(store, scheduler, reason, message, loop.time() - start)
    if not pool.single:
        summary["keys"] = [{"key": k.name, "state": k.state.value, "submitted": k.submitted,
                            "rate": k.limiter.snapshot()} for k in pool.keys]
    try:
        if limiter is not None:
            summary.update(limiter.snapshot())  # configured/effective rate, learned limit, 429s: kept per run
        store.run_log.finish(run_id, code, reason.value, summary)
    except LocalFaultError as error:
        # The database cannot be written (disk full): everything before this was committed; only this run's
        # own record stays open (`batchgen status` tells, from the lock file, whether it still runs).
        progress.event("warning", {"message": f"could not record the end of this run: {error}"})
    await asyncio.to_thread(_write_export, store, storage, progress)
    progress.summary(summary)
    return code


def _finish(store: Store, scheduler: Scheduler, reason: StopReason, message: str,
            elapsed_s: float) -> tuple[int, dict[str, Any]]:
    counts = store.counts()
    totals = store.credit_totals()
    images, _ = store.image_totals()
    c = scheduler.counters
    total = sum(v for k, v in counts.items() if k != "removed")
    unfinished = counts["pending"] + counts["submitted"] + counts["completed"]
    if reason is not StopReason.FINISHED or unfinished:
        code, outcome = EXIT_STOPPED, "stopped early (resumable)"
        if reason is StopReason.FINISHED:
            message = f"{plural(unfinished, 'request')} not finished yet; the next run continues them"
    elif counts["failed"]:
        code, outcome = EXIT_FAILED, "finished with failures"
    else:
        code, outcome = EXIT_DONE, "finished"
    summary = {
        "outcome": outcome, "exit_code": code, "reason": reason.value, "message": message,
        "resumable": code == EXIT_STOPPED, "total": total, "done": counts["done"], "failed": counts["failed"],
        "pending": counts["pending"], "in_flight": counts["submitted"] + counts["completed"],
        "submitted": c.submitted, "replayed": c.replayed, "polls": c.polls, "tasks_polled": c.tasks_polled,
        "requeued": c.requeued, "left": c.left, "images_saved": c.images, "images": images,
        # `credits_used`/`credits_reserved` are the job's (scripts read them so); `run_credits_used` is this run's.
        "credits_used": round(totals.used, 4), "credits_reserved": round(totals.reserved, 4),
        "run_credits_used": round(c.run_credits_used, 4),
        "elapsed_s": round(elapsed_s, 3),
    }
    return code, summary


async def _share_budget(store: Store, pool: KeyPool, settings: RunSettings) -> None:
    """Every heartbeat: this runner's share of each key's budget follows the number of live runners."""
    rate = parse_rate(settings.rate)
    interval = getattr(store, "lease_s", LEASE_S) / 3
    while True:
        await asyncio.sleep(interval)
        with contextlib.suppress(BatchgenError):  # the database away for a moment: keep the last share
            runners = len(store.runners.live())
            for key in pool.keys:
                shares.apply_share(key.limiter, (key.spec.rate or rate).per_second, runners)


async def _tick(progress: Progress) -> None:
    while True:
        await asyncio.sleep(progress.tick_interval_s())
        progress.tick()


async def _preflight(store: Store, key: PooledKey, scheduler: Scheduler, progress: Progress) -> None:
    """Check the key and the balance before sending work; say plainly when the balance falls short. The
    key's state and balance are recorded for status, as for each key of a pool."""
    if not store.has_pending():
        return
    estimate = store.pending_estimate()
    try:
        credits = await key.client.credits()
    except ConnectError as error:
        scheduler.halt(StopReason.UNREACHABLE, f"cannot reach the API ({error}); nothing was sent: check the "
                       "network or --api-base and run again")
        return
    except ApiError as error:
        if error.status in (401, 402):
            store.key_states.record(key.fingerprint, key.label, refusal_state(error.status).value, error.message)
            scheduler.drain(StopReason.AUTH, f"the API refused the key ({error}); fix EVOLINK_API_KEY or the "
                            "balance and run again")
        else:
            progress.event("warning", {"message": f"could not check the balance: {error}"})
        return
    if credits is None or credits.remaining is None:
        return
    key.balance = credits.remaining
    store.key_states.record(key.fingerprint, key.label, KeyState.ACTIVE.value, balance=credits.remaining)
    fields = {"remaining": credits.remaining, "estimate": round(estimate, 4)}
    if credits.remaining < estimate:
        progress.event("warning", {**fields, "message": (
            f"the balance ({credits_text(credits.remaining)} credits) cannot cover this run's estimate "
            f"({credits_text(estimate)} credits); "
            "it will stop with 402 when the credits run out (resumable after a top-up)")})
    else:
        progress.event("preflight", {**fields, "message": f"balance {credits_text(credits.remaining)} credits, "
                                     f"this run needs about {credits_text(estimate)}"})


async def _preflight_pool(store: Store, pool: KeyPool, scheduler: Scheduler, progress: Progress) -> None:
    """Each key's balance (and that it works) before sending work; a refused key leaves the pool."""
    if not store.has_pending():
        return
    estimate = store.pending_estimate()
    for key in pool.keys:
        try:
            credits = await key.client.credits()
        except ConnectError as error:
            scheduler.halt(StopReason.UNREACHABLE, f"cannot reach the API ({error}); nothing was sent: check the "
                           "network or --api-base and run again")
            return
        except ApiError as error:
            if error.status in (401, 402):
                state = refusal_state(error.status)
                pool.fail(key, state, error.message)
                store.key_states.record(key.fingerprint, key.label, state.value, error.message)
                progress.event("key_failed", {"key": key.name, "state": state.value, "message": (
                    f"key {key.name} was refused at the balance check ({error}); the run goes on without it")})
            else:
                progress.event("warning", {"message": f"could not check the balance of key {key.name}: {error}"})
            continue
        if credits is not None and credits.remaining is not None:
            key.balance = credits.remaining
            store.key_states.record(key.fingerprint, key.label, KeyState.ACTIVE.value, balance=credits.remaining)
    if not pool.active:
        scheduler.drain(StopReason.AUTH, "the API refused every key; fix the keys or their balances and run again")
        return
    known = [k.balance for k in pool.active if k.balance is not None]
    total = sum(known)
    # A balance the API did not report is unknown, not zero: `remaining` is null when no key reported one.
    fields = {"remaining": round(total, 4) if known else None, "estimate": round(estimate, 4),
              "keys": len(pool.active), "keys_with_balance": len(known)}
    if len(known) == len(pool.active) and total < estimate:
        progress.event("warning", {**fields, "message": (
            f"the keys' balances ({credits_text(total)} credits together) cannot cover this run's estimate "
            f"({credits_text(estimate)} "
            "credits); it will stop when they run out (resumable after a top-up)")})
    else:
        if not known:
            balance = "balance unknown (the API did not report one)"
        elif len(known) < len(pool.active):
            balance = f"balance {credits_text(total)} credits on the {len(known)} that reported one"
        else:
            balance = f"balance {credits_text(total)} credits together"
        progress.event("preflight", {**fields, "message": f"{plural(len(pool.active), 'key')}, {balance}, "
                                     f"this run needs about {credits_text(estimate)}"})


def _write_export(store: Store, storage: Storage, progress: Progress) -> None:
    """The export and provenance index (issue 7) go to the output folder or bucket at the end of every run."""
    try:
        from batchgen.results.export import write_run_files
    except ImportError:
        return
    try:
        write_run_files(store.target, storage, store.job_name)  # index.jsonl (provenance) and results.csv
    except Exception as error:  # an export problem must not turn a good run into a crash
        progress.event("warning", {"message": f"could not write the export: {error}"})
