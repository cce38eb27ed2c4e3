"""`batchgen status`: where a job stands, read from its store without disturbing a run in progress.

`collect(db_path)` returns a plain dict (the `--json` output, stable keys) and `render_text()` turns it into
the human view. It reads only: the database is in WAL mode, so a running `batchgen run` and any number of
status calls can look at it at the same time, and no lock is taken.

JSON keys: `job`, `total` (the requests of the current manifest; the state counts are of those),
`pending`, `in_flight` (submitted + completed, i.e. a task exists and its images are not all on disk),
`submitted`, `completed`, `done`, `failed`, `removed` (requests no longer in the manifest, whatever their
state: store/live.py), `waiting_retry` (pending with a future not-before), `credits` {`reserved` (tasks in
flight), `used` (finished tasks), `spent` (both), `estimated_remaining` (catalogue estimate of what is pending)},
`images` (files saved), `image_bytes`, `failures` [{`code`, `count`, `messages` [{`message`, `count`}] (the 3
commonest), `other_messages` (the failures of that code not among them)}],
`last_run` ({`started_at`, `finished_at`, `exit_code`, `reason`, `rate`} or null), `runs` (the same for every
run, oldest first). `rate` is what the run's rate controller ended at: {`configured_rate`, `ceiling`,
`effective_rate`, `learned_limit` (null when the server never answered 429), `throttles` (429s received),
`burst`}, or null for a run that was killed before its summary. `keys` (issue 15: one entry per API key
the job has used, by fingerprint — never the key): `key` (label, else fingerprint), `fingerprint`,
`label`, `state` (active, revoked, out_of_credits; "unknown" for keys seen only on attempts), `reason`,
`requests` (attempts sent with it), `credits_used`, `credits_reserved`, `in_flight`, `balance` (last seen).
`review` {`approved`,
`rejected` (current images a person rejected, not yet regenerated), `unreviewed`, `regenerating`
(requests requeued after a reject, not finished yet), `set_aside` (images kept under _rejected/),
`check_failed` (current images flagged by the automatic checks, `on_fail: keep`)}, `runners` (shared stores:
the live runners of the job, [{`id`, `host`, `pid`, `since`, `heartbeat_at`, `claimed`}]; always [] with SQLite).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from batchgen.store.open import open_store
from batchgen.units import credits_text, plural, rate_text


def collect(db_path: Path | str, job_name: str | None = None) -> dict[str, Any]:
    with open_store(db_path, job_name) as store:
        job = store.job_record()
        counts = store.counts()
        credits = store.credit_totals()
        images, image_bytes = store.image_totals()
        now = time.time()
        waiting = store.waiting_retry(now)
        runs = store.run_log.all()
        out: dict[str, Any] = {
            "job": job["name"] if job else None,
            "output_dir": job["output_dir"] if job else None,
            "total": sum(v for k, v in counts.items() if k != "removed"),
            "pending": counts["pending"],
            "in_flight": counts["submitted"] + counts["completed"],
            "submitted": counts["submitted"],
            "completed": counts["completed"],
            "done": counts["done"],
            "failed": counts["failed"],
            "removed": counts["removed"],
            "waiting_retry": int(waiting),
            "credits": {"reserved": round(credits.reserved, 4), "used": round(credits.used, 4),
                        "spent": round(credits.spent, 4),
                        "estimated_remaining": round(store.pending_estimate(), 4)},
            "images": images,
            "image_bytes": image_bytes,
            "failures": _with_other_messages(store.failures_by_code()),
            "last_run": None,
            "keys": [{"key": k["label"] or k["fingerprint"], "fingerprint": k["fingerprint"], "label": k["label"],
                      "state": k["state"], "reason": k["reason"], "requests": k["requests"],
                      "credits_used": round(k["credits_used"], 4), "credits_reserved": round(k["credits_reserved"], 4),
                      "in_flight": k["open"], "balance": k["balance"]} for k in store.key_states.usage()],
            "review": store.reviews.counts(),
            "runners": [{"id": r.id, "host": r.host, "pid": r.pid, "since": r.started_at,
                         "heartbeat_at": r.heartbeat_at, "claimed": r.claimed} for r in store.runners.live()],
        }
        out["runs"] = [_run_record(run) for run in runs]
        if runs:
            out["last_run"] = out["runs"][-1]
            if out["last_run"]["finished_at"] is None:
                # Still going, or killed? (A SQLite job's lock file, a shared store's live runners.)
                out["last_run"]["running"], out["last_run"]["pid"] = store.runners.running()
        return out


_RATE_KEYS = ("configured_rate", "ceiling", "effective_rate", "learned_limit", "throttles", "burst")


def _run_record(run: dict[str, Any]) -> dict[str, Any]:
    record = {k: run[k] for k in ("started_at", "finished_at", "exit_code", "reason")}
    summary = run.get("summary") or {}
    record["rate"] = {k: summary.get(k) for k in _RATE_KEYS} if "effective_rate" in summary else None
    return record


def render_text(s: dict[str, Any]) -> str:
    total = s["total"] or 0
    pct = f" ({100 * s['done'] / total:.0f}%)" if total else ""
    lines = [
        f"job {s['job'] or '?'}: {s['done']}/{total} done{pct}, {s['failed']} failed, {s['pending']} pending"
        + (f" ({s['waiting_retry']} waiting to retry)" if s["waiting_retry"] else "")
        + f", {s['in_flight']} in flight",
        f"credits: {credits_text(s['credits']['used'])} used, {credits_text(s['credits']['reserved'])} reserved by "
        "tasks in flight"
        + (f", about {credits_text(s['credits']['estimated_remaining'])} still to spend (estimate)"
           if s["credits"]["estimated_remaining"] else ""),
        f"images: {s['images']} saved ({_size(s['image_bytes'])})"
        + (f" in {s['output_dir']}" if s.get("output_dir") else ""),
    ]
    rv = s.get("review")
    if rv and (rv["approved"] or rv["rejected"] or rv["regenerating"] or rv["set_aside"] or rv["check_failed"]):
        lines.append(f"review: {rv['approved']} approved, {rv['rejected']} rejected, {rv['unreviewed']} unreviewed"
                     + (f", {rv['regenerating']} being regenerated" if rv["regenerating"] else "")
                     + (f"; {rv['check_failed']} flagged by the checks" if rv["check_failed"] else "")
                     + (f"; {plural(rv['set_aside'], 'image')} set aside in _rejected/" if rv["set_aside"] else ""))
    if s["removed"]:
        lines.append(f"removed: {plural(s['removed'], 'request')} no longer in the manifest")
    if s["failures"]:
        lines.append("failures by error code:")
        for f in s["failures"]:
            lines.append(f"  {f['code']}: {f['count']}")
            for m in f["messages"]:
                lines.append(f"      {m['count']} × {m['message']}")
            if f["other_messages"]:
                lines.append(f"      {f['other_messages']} more with other messages (`batchgen export` lists each)")
        lines.append("  (`batchgen retry` requeues them; `--code CODE` picks some)")
    for r in s.get("runners") or []:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["since"]))
        lines.append(f"runner {r['host']} pid {r['pid']}: since {since}, {plural(r['claimed'], 'request')} in flight")
    keys = s.get("keys") or []
    if len(keys) > 1 or any(k["state"] != "active" for k in keys):
        lines.append("keys:")
        for k in keys:
            state = k["state"].replace("_", " ") + (f" ({k['reason']})" if k["reason"] else "")
            lines.append(f"  {k['key']}: {plural(k['requests'], 'request')}, "
                         f"{credits_text(k['credits_used'])} credits used"
                         + (f", {k['in_flight']} in flight" if k["in_flight"] else "") + f", {state}")
    last = s.get("last_run")
    if last:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(last["started_at"]))
        if last["finished_at"]:
            ended = f"exit {last['exit_code']}, {last['reason']}"
        elif last.get("running"):
            ended = "running" + (f", pid {last['pid']}" if last.get("pid") else "")
        else:
            ended = "did not finish: stopped without recording its end (killed?); the next run resumes it"
        rate = last.get("rate")
        lines.append(f"last run: {when} ({ended})" + (f"; {rate_text(rate)}" if rate else ""))
    return "\n".join(lines)


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _with_other_messages(failures: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each code's count of failures whose message is not among the few shown, so none silently drops out."""
    return [{**f, "other_messages": f["count"] - sum(m["count"] for m in f["messages"])} for f in failures]
