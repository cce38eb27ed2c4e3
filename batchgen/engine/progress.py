"""What a run says while it works: a live line on a terminal, JSON events for logs, plain lines for cron.

Three audiences, one source: the scheduler calls `event(kind, fields)` for things that happen to a
request and keeps `Counters` up to date; this module decides what to print.

* terminal: one progress line (done/total, failed, in flight, requests/s, credits, ETA, and the rate
  controller's effective rate, learned limit and 429 count), redrawn at most four times a second on
  stderr, so stdout stays free for the summary;
* `--json`: one compact JSON object per line on stdout for every event (`submitted`, `completed`,
  `downloaded`, `done`, `requeued`, `failed`, `left`, `stopping`, `warning`, ...), each with `event`, `t`
  (epoch seconds) and the request `key` where there is one; a `rate` event (the limiter's `snapshot()`:
  `configured_rate`, `ceiling`, `effective_rate`, `learned_limit`, `throttles`, `burst`) at most once a
  second when any of it changed; then a final `summary` event (which carries the same keys;
  `credits_used`/`credits_reserved` are the job's, `run_credits_used` this run's: docs/run-engine.md);
* anything else (cron, a pipe): a plain progress line every `PLAIN_EVERY_S` seconds, warnings as they come.

A summary ends every run in every mode. Nothing here ever sees the API key.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from batchgen.engine.runstate import RAISE_CAP, Counters
from batchgen.units import credits_text, plural, rate_text

if TYPE_CHECKING:
    from batchgen.engine.ratelimit import AdaptiveLimiter

TTY_REDRAW_S = 0.25
PLAIN_EVERY_S = 15.0
JSON_RATE_EVERY_S = 1.0
# Events worth a line even when not in --json mode.
_NOTABLE = frozenset({"stopping", "warning", "preflight", "review_requeued", "runners", "key_failed"})
# --json: events are written as they happen and flushed at least this often, and at once for these.
JSON_FLUSH_S = 0.5
JSON_MAX_PENDING = 2000
# One encoder for every event: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)
_FLUSH_AT_ONCE = frozenset({"stopping", "warning", "preflight", "synced", "summary", "failed", "runners"})


class Progress:
    def __init__(self, mode: str, counters: Counters, *, out: TextIO | None = None, err: TextIO | None = None,
                 clock: Any = time.monotonic, limiter: AdaptiveLimiter | None = None) -> None:
        if mode not in ("tty", "json", "plain"):
            raise ValueError(f"unknown progress mode {mode!r}")
        self.mode = mode
        self.counters = counters
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self._pending: list[str] = []  # --json lines not yet written
        self.clock = clock
        self._started = clock()
        self._last_line = 0.0
        self._line_shown = False
        self.limiter = limiter
        self._last_rate: dict[str, Any] | None = None

    @classmethod
    def for_stream(cls, json_events: bool, counters: Counters, limiter: AdaptiveLimiter | None = None) -> Progress:
        if json_events:
            return cls("json", counters, limiter=limiter)
        return cls("tty" if sys.stderr.isatty() else "plain", counters, limiter=limiter)

    # --- events -----------------------------------------------------------------------------------

    def event(self, kind: str, fields: dict[str, Any]) -> None:
        if self.mode == "json":
            self._json({"event": kind, "t": round(time.time(), 3), **fields})
        elif kind in _NOTABLE:
            self._clear()
            self.err.write(f"batchgen: {fields.get('message', kind)}\n")
            self.err.flush()

    def _json(self, obj: dict[str, Any]) -> None:
        # Written out by tick() (at most JSON_FLUSH_S later), at once for the events a reader waits for. A
        # write per event was a system call per event (stdout is unbuffered under PYTHONUNBUFFERED), the
        # largest part of the runner's own cost per image.
        self._pending.append(_ENCODER.encode(obj) + "\n")
        if obj["event"] in _FLUSH_AT_ONCE or len(self._pending) >= JSON_MAX_PENDING:
            self.flush()

    def flush(self) -> None:
        """Write out the JSON events held back (the runner calls it on its way out too)."""
        if self._pending:
            self.out.write("".join(self._pending))
            self._pending.clear()
        self.out.flush()

    # --- the line ---------------------------------------------------------------------------------

    def tick(self) -> None:
        """Called periodically by the runner; prints only as often as the mode allows."""
        now = self.clock()
        if self.mode == "json":
            if self.limiter is not None and now - self._last_line >= JSON_RATE_EVERY_S:
                self._last_line = now
                snapshot = self.limiter.snapshot()
                if snapshot != self._last_rate:  # a steady run says it once, not every second
                    self._last_rate = snapshot
                    self.event("rate", snapshot)
            self.flush()
            return
        if self.mode == "tty" and now - self._last_line >= TTY_REDRAW_S:
            self._last_line = now
            self.err.write("\r\x1b[2K" + self.line())
            self.err.flush()
            self._line_shown = True
        elif self.mode == "plain" and now - self._last_line >= PLAIN_EVERY_S:
            self._last_line = now
            self.err.write(self.line() + "\n")
            self.err.flush()

    def tick_interval_s(self) -> float:
        return TTY_REDRAW_S if self.mode == "tty" else PLAIN_EVERY_S if self.mode == "plain" else JSON_FLUSH_S

    def line(self) -> str:
        c = self.counters
        elapsed = max(1e-6, self.clock() - self._started)
        rate = c.done_this_run / elapsed
        remaining = max(0, c.total - c.done - c.failed)
        eta = _duration(remaining / rate) if rate > 0 and remaining else "-"
        line = (f"{c.done}/{c.total} done, {c.failed} failed, {c.in_flight} in flight, {rate:.1f} req/s, "
                f"credits {credits_text(c.credits_used)} used + {credits_text(c.credits_reserved)} reserved, ETA {eta}")
        if self.limiter is not None:
            line += ", " + rate_text(self.limiter.snapshot())
        return line

    def _clear(self) -> None:
        if self.mode == "tty" and self._line_shown:
            self.err.write("\r\x1b[2K")
            self._line_shown = False

    # --- the end ----------------------------------------------------------------------------------

    def summary(self, summary: dict[str, Any]) -> None:
        if self.mode == "json":
            self._json({"event": "summary", "t": round(time.time(), 3), **summary})
            return
        self._clear()
        c = summary
        # The first line is the job, the second this run only: the job's credits go with the job's counts.
        reserved = (f", {credits_text(c['credits_reserved'])} reserved by tasks in flight"
                    if c["credits_reserved"] else "")
        lines = [
            f"batchgen: {c['outcome']} — {c['done']}/{c['total']} done, {c['failed']} failed, "
            f"{c['pending']} pending, {c['in_flight']} in flight; "
            f"job total {credits_text(c['credits_used'])} credits used{reserved}",
            f"  this run: {c['submitted']} submitted, {plural(c['images_saved'], 'image')} saved, "
            f"{plural(c['polls'], 'poll call')}, {c['elapsed_s']:.1f}s; "
            f"credits used {credits_text(c['run_credits_used'])}",
        ]
        if c.get("effective_rate") is not None:
            lines.append(f"  {rate_text(c)}")
        if c.get("message") and c["message"] != "finished":
            lines.append(f"  {c['message']}")
        if c.get("resumable") and RAISE_CAP not in (c.get("message") or ""):
            lines.append("  run the same command again to resume")
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 90:
        return f"{seconds}s"
    if seconds < 5400:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
