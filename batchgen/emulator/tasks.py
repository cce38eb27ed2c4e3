"""Task simulation: what happens to a generation task, worked out lazily when someone looks.

A task's whole fate is drawn when it is created — latency from its model's distribution in the catalogue,
outcome (completed, an error code, stalled, cancelled), how many images it returns — from a random
generator seeded by the emulator's seed and the request itself, so the same request meets the same fate in
every run whatever order requests arrive in. Reads compute status, progress and estimated_time from the
creation time and that plan; no timer runs per task, so tens of thousands of tasks cost only memory.
Credits are settled (charge what was returned, refund the rest) through a heap of end times that every
request drains, so balances and counters are right even for tasks nobody polls.
"""

from __future__ import annotations

import heapq
import math
import random
import re
import string
import time
from dataclasses import dataclass, field
from typing import Any

from batchgen import catalog
from batchgen.emulator.accounts import Accounts
from batchgen.emulator.clock import Clock
from batchgen.emulator.config import EmulatorConfig
from batchgen.emulator.faults import IMAGE_FAULTS, TASK_ERROR_CODES
from batchgen.emulator.stats import Stats
from batchgen.models import GenerationRequest, canonical_json

TASK_ID_PREFIX = "task-unified-"
_SUFFIX_ALPHABET = string.ascii_lowercase + string.digits

# error.message per task error code, worded after the reference's "Resolution" column.
TASK_ERROR_MESSAGES: dict[str, str] = {
    "content_policy_violation": "The request was rejected by the content policy. Rephrase the prompt.",
    "invalid_parameters": "Invalid parameters for this model.",
    "image_dimension_mismatch": "The input image does not match the requested aspect ratio.",
    "image_processing_error": "An input image could not be processed (format, size or URL not accessible).",
    "model_unavailable": "The model is currently unavailable.",
    "generation_timeout": "Generation timed out.",
    "quota_exceeded": "Quota exceeded.",
    "resource_exhausted": "Resources exhausted. Try again later.",
    "service_error": "Service error. Retry after 1 minute.",
    "generation_failed_no_content": "The model returned no content.",
    "upstream_error": "Upstream provider error.",
    "unknown_error": "Unknown error.",
    "service_unavailable": "Service unavailable.",
    "request_cancelled": "The task was cancelled.",
    "resource_not_found": "A referenced resource was not found.",
}
assert set(TASK_ERROR_MESSAGES) == set(TASK_ERROR_CODES), "one message per task error code"

# Errors a real service reports soon after it starts (checks of the input), rather than at the end.
_EARLY_ERRORS = frozenset({"content_policy_violation", "invalid_parameters", "image_dimension_mismatch",
                           "image_processing_error", "model_unavailable"})
# Spread of the latency distribution around the model's median (lognormal sigma).
_LATENCY_SIGMA = 0.45
_MAX_PENDING_S = 2.0

RESULT_PATH_RE = re.compile(r"^[a-z0-9]+/images/\d{4}/\d{2}/\d{2}/(?P<token>[0-9a-f]{32})_(?P<index>\d+)\.png$")


@dataclass(slots=True, eq=False)
class Task:
    id: str
    key: str  # the API key that owns it
    model: str
    prompt: str
    size: str | None
    n: int
    created: float  # clock seconds
    pending_s: float  # real seconds in "pending"
    nominal_s: float  # real seconds it expects to take (estimated_time counts down to it)
    end_s: float  # real seconds until final; inf while stalled
    outcome: str  # "completed", "failed", "cancelled" or "stalled"
    error_code: str | None
    images: int
    credits_per_image: float
    credits_reserved: float
    token: str  # 32 hex digits in the result URLs
    idempotency_key: str | None = None
    settled: bool = False
    # Clock time of the first answer that showed the task final: how long a finished task waited to be seen.
    seen_final_at: float | None = None
    result_tails: list[str] = field(default_factory=list)
    image_fault: str | None = None  # faults.IMAGE_FAULTS: the images it returns are bad on purpose
    generation: int = 0  # earlier tasks with the same prompt, size and index: a regeneration draws anew

    def status_at(self, now: float) -> str:
        elapsed = now - self.created
        if elapsed >= self.end_s:
            return self.outcome
        return "pending" if elapsed < self.pending_s else "processing"

    @property
    def ended_at(self) -> float:
        return self.created + self.end_s

    @property
    def credits_used(self) -> float:
        return round(self.credits_per_image * self.images, 4) if self.outcome == "completed" else 0.0


class TaskBook:
    def __init__(self, config: EmulatorConfig, clock: Clock, accounts: Accounts, stats: Stats) -> None:
        self.config = config
        self.clock = clock
        self.accounts = accounts
        self.stats = stats
        self.tasks: dict[str, Task] = {}
        self.by_token: dict[str, Task] = {}
        self._due: list[tuple[float, int, Task]] = []
        self._seq = 0
        self._occurrences: dict[str, int] = {}
        self._generations: dict[tuple[str, str | None], int] = {}
        self._entropy = random.Random(config.seed)

    # --- creation ------------------------------------------------------------------------------------

    def _task_rng(self, request: GenerationRequest) -> random.Random:
        if self.config.seed is None:
            return random.Random(self._entropy.getrandbits(64))
        body = canonical_json(request.model_dump(mode="json", exclude_none=True))
        seen = self._occurrences.get(body, 0)
        self._occurrences[body] = seen + 1
        return random.Random(f"{self.config.seed}|{seen}|{body}")

    def create(self, key: str, request: GenerationRequest, now: float, *, idempotency_key: str | None = None,
               forced: str | None = None, refs_ok: bool = True) -> Task:
        """A new task; `forced` is a rule's fault (an error code, "stall", "slow" or "cancel"), `refs_ok`
        False when an image reference points at an expired or deleted upload."""
        info = catalog.MODELS[request.model]
        rng = self._task_rng(request)
        faults = self.config.faults.tasks

        latency = self.config.latency_s
        if latency is None and self.config.latency_range_s is not None:
            latency = rng.uniform(*self.config.latency_range_s)
        if latency is None:
            drawn = info.latency_median_s * math.exp(rng.gauss(0.0, _LATENCY_SIGMA))
            latency = min(info.latency_max_s, max(info.latency_min_s, drawn))
        outcome, error_code = "completed", None
        image_fault: str | None = None
        if forced in IMAGE_FAULTS:
            image_fault, forced = forced, None
        if forced is not None:
            if forced == "stall":
                outcome = "stalled"
            elif forced in ("cancel", "request_cancelled"):
                outcome, error_code = "cancelled", "request_cancelled"
            elif forced != "slow":
                outcome, error_code = "failed", forced
        elif not refs_ok:
            outcome, error_code = "failed", "image_processing_error"
        else:
            outcome, error_code = self._draw_outcome(rng)
        if forced == "slow" or (forced is None and faults.slow and rng.random() < faults.slow):
            latency *= faults.slow_factor

        pending = min(_MAX_PENDING_S, 0.1 * latency)
        end = latency
        if outcome == "stalled":
            end = math.inf
        elif outcome == "cancelled":
            end = pending + 0.5 * (latency - pending)
        elif error_code in _EARLY_ERRORS:
            end = pending + 0.1 * (latency - pending)

        if outcome == "completed" and image_fault is None and faults.bad_images:
            u = rng.random()
            for kind in IMAGE_FAULTS:
                share = faults.bad_images.get(kind, 0.0)
                if u < share:
                    image_fault = kind
                    break
                u -= share
        images = request.n
        if outcome == "completed" and request.n > 1 and rng.random() < self.config.partial_results_share:
            images = rng.randint(1, request.n - 1)

        generation = self._generations.get((request.prompt, request.size), 0)
        if outcome == "completed":
            self._generations[(request.prompt, request.size)] = generation + 1
        task_id = self._new_id(now, rng)
        scale = self.clock.time_scale
        task = Task(
            id=task_id, key=key, model=request.model, prompt=request.prompt, size=request.size, n=request.n,
            created=now, pending_s=pending * scale, nominal_s=latency * scale, end_s=end * scale,
            outcome=outcome, error_code=error_code, images=images if outcome == "completed" else 0,
            credits_per_image=info.credits_per_image, credits_reserved=info.credits_for(request.n),
            token=f"{rng.getrandbits(128):032x}", idempotency_key=idempotency_key, image_fault=image_fault,
            generation=generation,
        )
        self.tasks[task_id] = task
        self.stats.tasks_created += 1
        if task.outcome == "completed":
            self.by_token[task.token] = task
            task.result_tails = self._result_tails(task)
        if math.isfinite(task.end_s):
            self._schedule(task)
        return task

    def _draw_outcome(self, rng: random.Random) -> tuple[str, str | None]:
        faults = self.config.faults.tasks
        if faults.stalled and rng.random() < faults.stalled:
            return "stalled", None
        if faults.cancelled and rng.random() < faults.cancelled:
            return "cancelled", "request_cancelled"
        if faults.errors:
            u = rng.random()
            for code in TASK_ERROR_CODES:
                p = faults.errors.get(code, 0.0)
                if u < p:
                    return "failed", code
                u -= p
        return "completed", None

    def _new_id(self, now: float, rng: random.Random) -> str:
        while True:
            suffix = "".join(rng.choices(_SUFFIX_ALPHABET, k=8))
            task_id = f"{TASK_ID_PREFIX}{int(now)}-{suffix}"
            if task_id not in self.tasks:
                return task_id

    def _result_tails(self, task: Task) -> list[str]:
        day = time.strftime("%Y/%m/%d", time.gmtime(task.ended_at))
        acct = self.accounts.account_id(task.key)
        return [f"{acct}/images/{day}/{task.token}_{i}.png" for i in range(task.images)]

    # --- settlement ----------------------------------------------------------------------------------

    def _schedule(self, task: Task) -> None:
        self._seq += 1
        heapq.heappush(self._due, (task.ended_at, self._seq, task))

    def settle(self, now: float) -> None:
        """Settle every task that has ended by `now`: charge or refund, count."""
        due = self._due
        while due and due[0][0] <= now:
            _, _, task = heapq.heappop(due)
            if task.settled or task.ended_at > now:
                continue  # already settled, or rescheduled
            task.settled = True
            used = task.credits_used
            self.accounts.settle(task.key, task.credits_reserved, used)
            stats = self.stats
            if task.outcome == "completed":
                stats.tasks_completed += 1
                stats.images_returned += task.images
                stats.credits_charged += used
            elif task.outcome == "cancelled":
                stats.tasks_cancelled += 1
            else:
                stats.tasks_failed += 1
                stats.task_errors[task.error_code or "unknown_error"] += 1

    def cancel(self, task: Task, now: float) -> bool:
        """End a running task as cancelled (the emulator's own control; the reference has no cancel call)."""
        if task.status_at(now) not in ("pending", "processing"):
            return False
        task.outcome, task.error_code, task.images = "cancelled", "request_cancelled", 0
        task.end_s = max(0.0, now - task.created)
        self._schedule(task)
        self.settle(now)
        return True

    # --- reading -------------------------------------------------------------------------------------

    def get(self, task_id: str, key: str) -> Task | None:
        task = self.tasks.get(task_id)
        # Another key's task does not exist, as far as this key can tell.
        return task if task is not None and task.key == key else None

    def result(self, tail: str, now: float) -> tuple[Task, int] | None:
        """The task and image index behind a result URL path, if it is still downloadable."""
        match = RESULT_PATH_RE.match(tail)
        if match is None:
            return None
        task = self.by_token.get(match["token"])
        index = int(match["index"])
        if task is None or index >= task.images or task.status_at(now) != "completed":
            return None
        if tail != task.result_tails[index]:
            return None
        if now >= task.ended_at + self.clock.real_s(self.config.result_ttl_s):
            return None
        return task, index

    def view(self, task: Task, now: float, origin: str) -> dict[str, Any]:
        """The task object as GET /v1/tasks/{id} answers it at `now`."""
        elapsed = now - task.created
        usage: dict[str, Any] = {"billing_rule": "per_call", "credits_reserved": task.credits_reserved,
                                 "user_group": "default"}
        body: dict[str, Any] = {"created": int(task.created), "id": task.id, "model": task.model,
                                "object": "image.generation.task"}
        if elapsed >= task.end_s:
            status = task.outcome
            if task.seen_final_at is None:
                task.seen_final_at = now
            body["progress"] = 100 if status == "completed" else _progress(task, task.end_s)
            body["status"] = status
            if status == "completed":
                urls = [f"{origin}/_emulator/files/{tail}" for tail in task.result_tails]
                body["results"] = urls
                body["result_data"] = [{"image_url": url} for url in urls]
            else:
                code = task.error_code or "unknown_error"
                body["error"] = {"code": code, "message": TASK_ERROR_MESSAGES[code]}
            body["task_info"] = {"can_cancel": False}
            usage["credits_used"] = task.credits_used
        else:
            body["progress"] = 0 if elapsed < task.pending_s else _progress(task, elapsed)
            body["status"] = "pending" if elapsed < task.pending_s else "processing"
            body["task_info"] = {"can_cancel": True}
            if self.config.estimated_time:
                body["task_info"]["estimated_time"] = self.clock.report_s(task.nominal_s - elapsed)
        body["type"] = "image"
        body["usage"] = usage
        return body

    def listing(self, now: float) -> list[dict[str, Any]]:
        """Every task, for tests (GET /_emulator/tasks)."""
        return [
            {"id": t.id, "model": t.model, "prompt": t.prompt, "size": t.size, "n": t.n,
             "idempotency_key": t.idempotency_key, "status": t.status_at(now),
             "error_code": t.error_code if t.status_at(now) in ("failed", "cancelled") else None,
             "images": t.images, "created": t.created, "account": self.accounts.account_id(t.key),
             "ended_at": t.ended_at if math.isfinite(t.end_s) else None, "seen_final_at": t.seen_final_at,
             "seen_final_after_s": None if t.seen_final_at is None else round(t.seen_final_at - t.ended_at, 6)}
            for t in self.tasks.values()
        ]


def _progress(task: Task, elapsed: float) -> int:
    span = task.nominal_s - task.pending_s
    if span <= 0:
        return 99
    return max(1, min(99, int(100 * (elapsed - task.pending_s) / span)))
