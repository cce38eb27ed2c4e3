"""The data batchgen passes between its parts: a generation request, an expanded request with its
identity, the job's settings, and the states a request moves through.

A manifest (manifest.py) turns into a `JobSpec` and a stream of `PlannedRequest`s; the store records them;
the scheduler moves them through `State`s. These models are strict (`extra="forbid"`) and the request is
frozen, so a request's key, computed from its canonical JSON, cannot drift from what is sent.
"""

from __future__ import annotations

import enum
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from batchgen import catalog

KEY_SCHEME = "v1"


class State(enum.StrEnum):
    """Where a request is. Stored as text in the `requests` table."""

    PENDING = "pending"  # waiting to be submitted (again, after `not_before`, for a requeued retry)
    SUBMITTED = "submitted"  # the API holds a task for it; its task id is on disk; being polled
    COMPLETED = "completed"  # the task finished with result URLs; images not all on disk yet
    DONE = "done"  # every returned image is on disk (the "downloaded")
    FAILED = "failed"  # failed for good (non-retryable, or out of attempts); `batchgen retry` requeues
    REMOVED = "removed"  # no longer in the manifest (its row changed or went away) and never submitted


FINAL_STATES = frozenset({State.DONE, State.FAILED, State.REMOVED})


class GenerationRequest(BaseModel):
    """One call to POST /v1/images/generations, validated against the model catalogue.

    `image_urls` and `mask_url` may hold local file paths (absolute, resolved by the manifest); the run
    uploads those through the Files API and sends the returned URLs (see uploads.py).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str = Field(min_length=1, max_length=catalog.MAX_PROMPT_CHARS)
    model: str = catalog.DEFAULT_MODEL
    size: str | None = None
    n: int = Field(default=1, ge=catalog.MIN_N, le=catalog.MAX_N)
    image_urls: tuple[str, ...] = Field(default=(), max_length=catalog.MAX_IMAGE_URLS)
    mask_url: str | None = None
    # Pass-through parameters newer models take (API_CONTRACT.md); sent only when set.
    quality: str | None = None
    resolution: str | None = None
    seed: int | None = None
    model_params: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_against_catalog(self) -> GenerationRequest:
        if not self.prompt.strip():
            raise ValueError("prompt is empty")
        problems = catalog.combination_problems(self.model, self.size, self.mask_url is not None,
                                                len(self.image_urls))
        if problems:
            raise ValueError("; ".join(message for _, message in problems))
        return self

    def local_paths(self) -> list[str]:
        """The references that are local files rather than http(s) URLs."""
        refs = [*self.image_urls, *([self.mask_url] if self.mask_url else [])]
        return [r for r in refs if not is_remote(r)]

    def api_body(self, url_for: dict[str, str] | None = None) -> dict[str, Any]:
        """The JSON body for the API, with local paths replaced through `url_for` (path → URL)."""
        sub = url_for or {}
        body: dict[str, Any] = {"model": self.model, "prompt": self.prompt}
        if self.size is not None:
            body["size"] = self.size
        if self.n != 1:
            body["n"] = self.n
        if self.image_urls:
            body["image_urls"] = [sub.get(u, u) for u in self.image_urls]
        if self.mask_url is not None:
            body["mask_url"] = sub.get(self.mask_url, self.mask_url)
        for name in ("quality", "resolution", "seed", "model_params"):
            value = getattr(self, name)
            if value is not None:
                body[name] = value
        return body

    def estimated_credits(self) -> float:
        info = catalog.get(self.model)
        return info.credits_for(self.n) if info else 0.0


def is_remote(ref: str) -> bool:
    return ref.startswith(("http://", "https://"))


# One encoder for every key: json.dumps with options builds a new encoder per call, a measurable share of
# expanding a million-row manifest. Same output as json.dumps(sort_keys=True, separators=(",", ":")).
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


def canonical_json(value: Any) -> str:
    return _CANONICAL(value)


def request_key(item_id: str, variant: dict[str, str], request: GenerationRequest) -> str:
    """Stable identity of a request: the same item, variant and parameters give the same key on every
    expansion; a changed prompt or parameter gives a new one. Versioned so the scheme can change."""
    return request_key_for_fields(item_id, variant, request.model_dump(mode="json", exclude_none=True))


def request_key_for_fields(item_id: str, variant: dict[str, str], fields: dict[str, Any]) -> str:
    """`request_key()` for a request given as its `model_dump(mode="json", exclude_none=True)` dict, so the
    manifest's hot loop can key a million rows without dumping each model; same scheme, same keys."""
    payload = canonical_json({"item": item_id, "variant": variant, "request": fields})
    return KEY_SCHEME + "-" + hashlib.sha256(payload.encode()).hexdigest()[:32]


class PlannedRequest(BaseModel):
    """One request as a manifest expands it: identity, parameters, and the fields file names and
    exports use. `metadata` holds the item's own columns (SKU, name, ...), untouched."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str
    item_id: str
    variant: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, str] = Field(default_factory=dict)
    request: GenerationRequest
    # Where in the manifest it came from, for messages: "products.csv row 17".
    source: str = ""


class RunSettings(BaseModel):
    """How a job runs. A YAML manifest's `run:` section; CLI flags override it."""

    model_config = ConfigDict(extra="forbid")

    rate: str = Field(default="5/s", description='request budget for all API calls, e.g. "5/s" or "300/min"')
    concurrency: int = Field(default=20, ge=1, le=1000, description="most tasks in flight at once")
    max_attempts: int = Field(default=3, ge=1, le=20, description="submissions per request before it fails")
    max_credits: float | None = Field(default=None, gt=0, description="stop before spend passes it")
    fallback_models: list[str] = Field(
        default_factory=list, description="models tried in order when a model is unavailable"
    )
    max_wait: str = Field(default="5m", description="longest a task is polled in one run before it is left "
                          "for the next run (its task id is kept)")
    patience: str = Field(default="5m", description="how long every API call may keep failing (429, 5xx, "
                          "timeouts, drops) before the run stops, resumably (exit 3)")
    regenerate_expired: bool = Field(
        default=False, description="requeue a request whose result URLs expired before download"
    )
    policy_pause_after: int = Field(
        default=20, ge=1, description="pause the job after this many content-policy refusals in a row"
    )
    download_concurrency: int = Field(default=8, ge=1, le=64)


class QualitySettings(BaseModel):
    """Automatic checks on every downloaded image (engine/quality.py). A YAML manifest's `quality:` section;
    on by default for every job, CSV jobs included."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="check every downloaded image")
    on_fail: Literal["regenerate", "keep"] = Field(
        default="regenerate", description="regenerate: set the image aside under _rejected/ and generate the "
        "request again (a new attempt, within max_attempts and the credit cap); keep: save it, flagged")
    min_side_px: int = Field(default=64, ge=1, le=16384, description="smallest acceptable short side, in pixels")
    aspect_tolerance: float = Field(default=0.05, ge=0, le=1, description="largest relative difference "
                                    "between the image's width/height and the requested size's")
    min_luminance_spread: float = Field(default=2.0, ge=0, le=128, description="smallest standard deviation "
                                        "of luminance (0-255); below it the image counts as blank")
    max_dominant_share: float = Field(default=0.995, gt=0, le=1, description="largest share of the pixels "
                                      "one colour may cover; above it the image counts as blank")


class OutputSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    folder: str = Field(default="", description="output folder, relative to the manifest (default out/<job>), "
                        "or a bucket: s3://bucket/prefix (any S3-compatible service; docs/storage.md)")
    filename: str = Field(
        default="{id}{variant}_{index}",
        description="file name template, without extension: item fields, matrix values, {id}, {variant} "
        "(matrix values joined with '_', led by '_'), {model}, {index} (1-based image number); "
        "may contain '/' for sub-folders but never leave the output folder",
    )
    endpoint_url: str | None = Field(default=None, description="for an s3:// folder: the S3 endpoint, e.g. "
                                     "https://<account>.r2.cloudflarestorage.com (default: AWS_ENDPOINT_URL, "
                                     "the AWS profile, else AWS S3)")
    region: str | None = Field(default=None, description="for an s3:// folder: the bucket's region (default: "
                               "AWS_REGION / AWS_DEFAULT_REGION or the AWS profile)")

    @field_validator("folder")
    @classmethod
    def _bucket_url(cls, value: str) -> str:
        if value.startswith("s3://"):
            from batchgen.storage.s3 import parse_bucket_url

            parse_bucket_url(value)  # ValueError names what is wrong with the bucket or prefix
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
            raise ValueError("must be an http(s) URL such as https://s3.eu-central-1.amazonaws.com, without "
                             "credentials in it (they come from the AWS configuration)")
        return value.rstrip("/")

    @field_validator("region")
    @classmethod
    def _region(cls, value: str | None) -> str | None:
        if value is not None and not (value and all(c.isalnum() or c == "-" for c in value) and len(value) <= 64):
            raise ValueError("must be a region name such as eu-central-1 or auto (letters, digits and '-')")
        return value


class JobSpec(BaseModel):
    """A job's settings as its manifest gives them, with paths made absolute."""

    model_config = ConfigDict(extra="forbid")

    name: str
    manifest_path: Path
    output: OutputSettings = Field(default_factory=OutputSettings)
    run: RunSettings = Field(default_factory=RunSettings)
    quality: QualitySettings = Field(default_factory=QualitySettings)

    @property
    def base_dir(self) -> Path:
        return self.manifest_path.parent

    def output_dir(self) -> Path:
        folder = self.output.folder or f"out/{self.name}"
        return (self.base_dir / folder).resolve()

    def output_location(self) -> str:
        """Where outputs go: `s3://bucket/prefix` as written, else the absolute output folder."""
        if self.output.folder.startswith("s3://"):
            return self.output.folder.rstrip("/")
        return str(self.output_dir())

    def default_db_path(self) -> Path:
        return self.base_dir / f"{self.manifest_path.stem}.batchgen.db"


class RunOptions(BaseModel):
    """What `batchgen run` was asked to do beyond the manifest; None means "the manifest's or default"."""

    model_config = ConfigDict(extra="forbid")

    db_path: Path | None = None
    # A postgresql:// URL instead of db_path (shared store; may carry a password: never printed).
    db_url: str | None = Field(default=None, repr=False)
    job: str | None = None  # the job's name in a shared store (default: the manifest's name)
    # A folder, or a bucket as the string "s3://bucket/prefix" (a Path would fold the "//").
    out_dir: Path | str | None = None
    emulator: bool = False
    api_base: str | None = None
    files_base: str | None = None
    # Read from EVOLINK_API_KEY by the CLI; never stored, logged or printed.
    api_key: str | None = Field(default=None, repr=False)
    # Several keys (issue 15): EVOLINK_API_KEYS (comma-separated) or --keys-file; the first given of
    # keys_file, api_keys, api_key is used. Never stored, logged or printed (only fingerprints are).
    api_keys: str | None = Field(default=None, repr=False)
    keys_file: Path | None = None
    rate: str | None = None
    concurrency: int | None = None
    max_credits: float | None = None
    max_runtime_s: float | None = None
    patience: str | None = None  # --patience: overrides run.patience
    json_events: bool = False
    # Client-side waits (reference poll waits, backoff) are multiplied by this; with --emulator it is
    # also the emulator's time scale, so the two agree.
    time_scale: float = 1.0
    # Emulator settings for --emulator (seed, faults scenario); ignored otherwise.
    emulator_seed: int | None = None
    emulator_scenario: Path | None = None
