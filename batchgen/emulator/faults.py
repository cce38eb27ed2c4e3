"""Fault injection: what can go wrong, how often, and for which prompts.

Two kinds, both loaded from a scenario YAML (see docs/emulator.md):

* probabilities, drawn from the seeded random generator: HTTP 429/500/502/503 and dropped connections on
  submit, on poll and on upload; each task error code; stalled, slow and cancelled tasks;
* deterministic rules: "a prompt matching this pattern fails with this code for its first k attempts",
  which is how engine tests prove that a retryable failure succeeds once the fault clears.

`FaultInjector` only decides; the routes and the task simulation apply the decision.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from batchgen.errors import TASK_RULES

Probability = Annotated[float, Field(ge=0.0, le=1.0)]

# Every task error code the emulator can produce: the reference's table plus the codes public clients
# have seen. errors.TASK_RULES is the one list of them.
TASK_ERROR_CODES: tuple[str, ...] = tuple(TASK_RULES)

# Outcomes a rule can force on a task instead of an error code.
TASK_BEHAVIOURS = ("stall", "slow", "cancel")
# Bad results: the task completes and is charged, but its images are a flat frame, the wrong aspect ratio
# (the requested ratio turned on its side, or 2:1 for a square), or a 16 px thumbnail (issue 16).
IMAGE_FAULTS = ("blank", "wrong_aspect", "tiny")
# Connection-level outcomes: close before answering, or create the task and then close (a lost response).
DROPS = ("drop", "drop_after")
HTTP_FAULT_STATUSES = (400, 401, 402, 403, 404, 409, 413, 429, 500, 502, 503, 504)


class HttpFaults(BaseModel):
    """Per-request probabilities on one kind of call."""

    model_config = ConfigDict(extra="forbid")

    http_429: Probability = 0.0
    http_500: Probability = 0.0
    http_502: Probability = 0.0
    http_503: Probability = 0.0
    drop: Probability = Field(default=0.0, description="close the connection without answering")
    drop_after: Probability = Field(default=0.0, description="submit only: create the task, then close "
                                    "the connection (the client loses the response)")

    @model_validator(mode="after")
    def _one_draw(self) -> HttpFaults:
        # One draw decides between them, so together they cannot exceed certainty.
        if self.http_429 + self.http_500 + self.http_502 + self.http_503 + self.drop + self.drop_after > 1.0:
            raise ValueError("these probabilities add up to more than 1")
        return self


class TaskFaults(BaseModel):
    """Per-task probabilities, drawn once when the task is created."""

    model_config = ConfigDict(extra="forbid")

    errors: dict[str, Probability] = Field(default_factory=dict)
    stalled: Probability = Field(default=0.0, description="processing forever")
    slow: Probability = Field(default=0.0, description="latency multiplied by slow_factor")
    slow_factor: float = Field(default=5.0, ge=1.0)
    cancelled: Probability = 0.0
    bad_images: dict[str, Probability] = Field(default_factory=dict, description="share of completed tasks "
                                               "whose images are bad: blank, wrong_aspect, tiny")

    @field_validator("bad_images")
    @classmethod
    def _known_image_faults(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(IMAGE_FAULTS))
        if unknown:
            raise ValueError(f"unknown bad image kind(s) {', '.join(unknown)}; use {', '.join(IMAGE_FAULTS)}")
        if sum(value.values()) > 1.0:
            raise ValueError("bad image shares add up to more than 1")
        return value

    @field_validator("errors")
    @classmethod
    def _known_codes(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(TASK_ERROR_CODES))
        if unknown:
            raise ValueError(f"unknown task error code(s) {', '.join(unknown)}; use {', '.join(TASK_ERROR_CODES)}")
        if sum(value.values()) > 1.0:
            raise ValueError("task error probabilities add up to more than 1")
        return value


class Faults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    submit: HttpFaults = Field(default_factory=HttpFaults)
    poll: HttpFaults = Field(default_factory=HttpFaults)
    upload: HttpFaults = Field(default_factory=HttpFaults)
    tasks: TaskFaults = Field(default_factory=TaskFaults)
    # Emulated seconds an injected 429 or 503 asks the client to wait (scaled by time_scale).
    retry_after_s: float = Field(default=30.0, ge=0.0)


class FaultRule(BaseModel):
    """A deterministic fault: submissions whose prompt (and model, if given) match fail with `fail_with`
    for the first `times` matching submissions (every time when `times` is omitted), then succeed."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(default=None, description="regular expression searched in the prompt")
    model: str | None = None
    fail_with: int | str = Field(description="a task error code, an HTTP status, drop, drop_after, stall, "
                                 "slow, cancel, or a bad image: blank, wrong_aspect, tiny")
    times: int | None = Field(default=None, ge=1)

    @field_validator("prompt")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as error:
                raise ValueError(f"not a valid regular expression: {error}") from None
        return value

    @field_validator("fail_with")
    @classmethod
    def _known_fault(cls, value: int | str) -> int | str:
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, int):
            if value not in HTTP_FAULT_STATUSES:
                raise ValueError(f"HTTP status {value} is not one the emulator injects; use one of "
                                 + ", ".join(map(str, HTTP_FAULT_STATUSES)))
            return value
        if value not in (*TASK_ERROR_CODES, *TASK_BEHAVIOURS, *DROPS, *IMAGE_FAULTS):
            raise ValueError(f'"{value}" is not a task error code, an HTTP status, drop, drop_after, stall, '
                             "slow, cancel, blank, wrong_aspect or tiny")
        return value


@dataclass(frozen=True)
class HttpFault:
    """What to do to one request instead of (or after) answering it normally."""

    kind: Literal["status", "drop", "drop_after"]
    status: int = 0


class FaultInjector:
    """Draws request-level faults and matches rules. Task-level probabilities are drawn by the task
    simulation from the task's own generator (so a task's fate does not depend on request order)."""

    def __init__(self, faults: Faults, rules: list[FaultRule], rng: random.Random) -> None:
        self.faults = faults
        self.rules = rules
        self._patterns = [re.compile(r.prompt) if r.prompt is not None else None for r in rules]
        self._rng = rng
        # Matching submissions seen per (rule, prompt): the "first k attempts" of a rule.
        self._attempts: dict[tuple[int, str], int] = {}

    def draw(self, which: HttpFaults) -> HttpFault | None:
        """A fault for one request, or None. One draw decides, so the probabilities add up."""
        if not (which.http_429 or which.http_500 or which.http_502 or which.http_503 or which.drop
                or which.drop_after):
            return None
        u = self._rng.random()
        for kind, p in (("drop", which.drop), ("drop_after", which.drop_after)):
            if u < p:
                return HttpFault(kind)  # type: ignore[arg-type]
            u -= p
        for status, p in ((429, which.http_429), (500, which.http_500), (502, which.http_502),
                          (503, which.http_503)):
            if u < p:
                return HttpFault("status", status)
            u -= p
        return None

    def match(self, prompt: str, model: str) -> int | str | None:
        """The fault of the first rule this submission triggers, counting it as one attempt."""
        for index, rule in enumerate(self.rules):
            pattern = self._patterns[index]
            if pattern is not None and not pattern.search(prompt):
                continue
            if rule.model is not None and rule.model != model:
                continue
            if rule.times is None:
                return rule.fail_with
            seen = self._attempts.get((index, prompt), 0)
            self._attempts[(index, prompt)] = seen + 1
            if seen < rule.times:
                return rule.fail_with
        return None
