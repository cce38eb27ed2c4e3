"""The emulator's settings, and the scenario YAML that sets them.

One strict pydantic model holds everything that can change how the emulator behaves. A scenario file is
that model written as YAML (any subset of its fields); `from_options` merges it with the CLI's flags.
Mistakes in a scenario are a ConfigError that names the file and the field, never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from batchgen import catalog
from batchgen.emulator.faults import FaultRule, Faults
from batchgen.errors import ConfigError, ManifestError


class AccountConfig(BaseModel):
    """One key as its own account (issue 15): its own rate limit, balance and, for tests, a revocation."""

    model_config = ConfigDict(extra="forbid")

    api_key: str = Field(min_length=1, description="the Bearer key of this account")
    rate_limit: float | None = Field(default=None, gt=0, description="requests/s of this key (real time); "
                                     "None: the emulator's rate_limit")
    credits: float | None = Field(default=None, ge=0, description="starting balance; None: initial_credits")
    revoke_after_submits: int | None = Field(default=None, ge=0, description="revoke the key (401 on every "
                                             "call from then on) once it has created this many tasks")


class EmulatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_keys: list[str] = Field(default_factory=list, description="accepted Bearer keys; empty: any non-empty key")
    time_scale: float = Field(default=1.0, gt=0, description="multiplies every emulated duration")
    seed: int | None = Field(default=None, description="seed for every random choice")
    rate_limit: float | None = Field(default=None, gt=0, description="requests per second per key across all "
                                     "API routes (real time); None: unlimited")
    rate_limit_burst: int | None = Field(default=None, ge=1, description="with rate_limit: a token bucket of "
                                         "this many requests instead of the sliding one-second window")
    initial_credits: float = Field(default=1_000_000.0, ge=0, description="starting balance of every key")
    # Newer-gateway features, each switchable off to emulate an older server.
    idempotency: bool = Field(default=True, description="honour Idempotency-Key on submits")
    batch_poll: bool = Field(default=True, description="serve POST /v1/tasks/batch (404 when off)")
    credits_endpoint: bool = Field(default=True, description="serve GET /v1/credits (404 when off)")
    estimated_time: bool = Field(default=True, description="report task_info.estimated_time on running tasks "
                                 "(off: clients must fall back to fixed-interval polling)")
    partial_results_share: float = Field(default=0.0, ge=0, le=1, description="share of n>1 tasks that "
                                         "return fewer images than asked")
    latency_s: float | None = Field(default=None, ge=0, description="fixed emulated latency of every task "
                                    "instead of the model's distribution (0: tasks are done on submit)")
    latency_range_s: tuple[float, float] | None = Field(default=None, description="emulated latency of every "
                                                        "task drawn uniformly from [low, high] instead of the "
                                                        "model's distribution (latency_s wins when both are set)")
    result_ttl_s: float = Field(default=catalog.RESULT_URL_TTL_S, gt=0, description="emulated lifetime of "
                                "result URLs after completion")
    upload_ttl_s: float = Field(default=catalog.UPLOAD_TTL_S, gt=0, description="emulated lifetime of uploads")
    files_quota: int = Field(default=100, ge=0, description="uploaded files per key")
    max_upload_bytes: int = Field(default=100 * 1024 * 1024, ge=1, description="largest accepted upload")
    max_request_bytes: int = Field(default=1024 * 1024, ge=1024, description="largest JSON body on API routes")
    files_errors_as_200: bool = Field(default=False, description="send Files API failures as HTTP 200 with "
                                      "success=false (the contract's second variant)")
    accounts: list[AccountConfig] = Field(default_factory=list, description="keys with their own rate limit, "
                                          "balance or revocation (also accepted when api_keys is set)")
    faults: Faults = Field(default_factory=Faults)
    rules: list[FaultRule] = Field(default_factory=list)

    @field_validator("latency_range_s")
    @classmethod
    def _ordered_range(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 <= value[0] <= value[1]:
            raise ValueError("must be [low, high] with 0 <= low <= high")
        return value

    @classmethod
    def from_options(cls, api_keys: list[str] | None = None, time_scale: float = 1.0, seed: int | None = None,
                     rate_limit: float | None = None, scenario_path: Path | None = None,
                     rate_limit_burst: int | None = None) -> EmulatorConfig:
        """The CLI's view: a scenario file (if any) with the flags on top.

        A flag overrides the scenario when it is given: keys when any, seed, rate limit and its burst when
        not None, the time scale when it is not the default 1.
        """
        values: dict[str, Any] = load_scenario(scenario_path) if scenario_path is not None else {}
        if api_keys:
            values["api_keys"] = list(api_keys)
        if seed is not None:
            values["seed"] = seed
        if rate_limit is not None:
            values["rate_limit"] = rate_limit
        if rate_limit_burst is not None:
            values["rate_limit_burst"] = rate_limit_burst
        if time_scale != 1.0 or "time_scale" not in values:
            values["time_scale"] = time_scale
        return _validated(values, str(scenario_path) if scenario_path else "emulator options")


def load_scenario(path: Path) -> dict[str, Any]:
    """A scenario file's mapping, checked against EmulatorConfig. Every problem is reported together, each
    with its line, field and what is allowed, in the words a manifest's problems use (ConfigError: exit 2)."""
    from batchgen.manifest.problems import Problems, pydantic_problems
    from batchgen.manifest.yamlsource import parse_yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "it is not UTF-8 text"
        raise ConfigError(f"{path}: cannot read the scenario: {reason or error}") from None
    try:
        data, root, duplicates = parse_yaml(text, str(path))
    except ManifestError as error:  # a syntax error, with its line
        raise ConfigError(str(error)) from None
    if data is None and not duplicates:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a scenario is a mapping of settings (see docs/emulator.md)")
    problems = Problems()
    for problem in duplicates:
        problems.add(problem.file, problem.location, problem.field, problem.message)
    try:
        EmulatorConfig.model_validate(data)
    except ValidationError as error:
        pydantic_problems(error, str(path), root, problems, schema=EmulatorConfig)
    if problems:
        lines = [str(p) for p in problems.items] + ([f"... and {problems.rest} more"] if problems.rest else [])
        count = len(problems.items) + problems.rest
        raise ConfigError(f"the scenario has {count} problem(s):\n  " + "\n  ".join(lines))
    return data


def _validated(values: dict[str, Any], source: str) -> EmulatorConfig:
    try:
        return EmulatorConfig.model_validate(values)
    except ValidationError as error:
        raise ConfigError(f"{source}: " + "; ".join(_describe(e) for e in error.errors())) from None


def _describe(error: Any) -> str:
    field = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = "unknown field" if error["type"] == "extra_forbidden" else error["msg"]
    return f"{field}: {message}"
