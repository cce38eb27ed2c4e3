"""The YAML manifest's schema as pydantic models: the single, self-documenting statement of which keys a
manifest may have, their types and defaults.

`extra="forbid"` everywhere, so a misspelt key (`matirx:`) is an error with its line rather than a setting
silently ignored. Rules that need the model catalogue (sizes per model, masks, editing models) are not
repeated here: they live in `GenerationRequest` and are applied to every expanded request.
`ManifestSchema.model_json_schema()` gives the whole schema with its descriptions.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from batchgen import catalog
from batchgen.models import OutputSettings, QualitySettings, RunSettings

# The request parameters a manifest can set (defaults, item fields or CSV columns, matrix variables).
REQUEST_PARAMS: tuple[str, ...] = (
    "prompt", "model", "size", "n", "image_urls", "mask_url", "quality", "resolution", "seed", "model_params",
)
# Parameters a matrix variable may vary; the others are per item (a prompt varies through the template).
MATRIX_PARAMS: frozenset[str] = frozenset({"model", "size", "n", "quality", "resolution", "seed", "mask_url"})

Scalar = str | int | float | bool


class RequestDefaults(BaseModel):
    """Request parameters for every item unless the item or a matrix variable sets them."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(default=None, description="prompt template (same as the top-level `prompt`)")
    model: str | None = Field(default=None, description="model name from `batchgen models` (API default "
                              "gpt-image-1.5)")
    size: str | None = Field(default=None, description='aspect ratio such as "16:9", or pixels "1024x1536" '
                             "for GPT models; unset = the model's default")
    n: int | None = Field(default=None, ge=catalog.MIN_N, le=catalog.MAX_N,
                          description="images per request, 1-4 (default 1)")
    image_urls: list[str] | None = Field(default=None, description="reference images: http(s) URLs or local "
                                         "paths relative to the manifest; at most 14")
    mask_url: str | None = Field(default=None, description="PNG mask (URL or local path); gpt-4o-image only")
    quality: str | None = Field(default=None, description="passed through to the API when set")
    resolution: str | None = Field(default=None, description="passed through to the API when set")
    seed: int | None = Field(default=None, description="passed through to the API when set")
    model_params: dict[str, Any] | None = Field(default=None, description="extra model parameters, passed "
                                                "through to the API when set")

    @field_validator("image_urls", mode="before")
    @classmethod
    def _one_url_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("n", "seed", mode="before")
    @classmethod
    def _a_whole_number_not_a_boolean(cls, value: Any) -> Any:
        # YAML's true/false would pass as 1/0 (pydantic's lax ints); an item's value is refused the same way
        # (values.coerce_param).
        if isinstance(value, bool):
            raise ValueError("a whole number is needed, not true or false")
        return value


class ManifestSchema(BaseModel):
    """A YAML job: what to generate (defaults, prompt template, items, matrix) and how (output, run)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, description="job name; default: the manifest's file name "
                             "without extension")
    defaults: RequestDefaults = Field(default_factory=RequestDefaults,
                                      description="request parameters for every item")
    prompt: str | None = Field(default=None, description="prompt template: {field} takes an item field, a "
                               "matrix variable or {id}; {{ and }} are literal braces")
    items: list[Any] | None = Field(default=None, description="inline items: a list of mappings of fields; "
                                    "fields named like request parameters override the defaults")
    items_csv: str | None = Field(default=None, description="CSV file of items, relative to the manifest "
                                  "(instead of `items`)")
    id_field: str | None = Field(default=None, description="item field that identifies an item; default the "
                                 "first of id, sku, name present, else the row number")
    matrix: dict[str, list[Scalar]] = Field(default_factory=dict, description="variants: name -> list of "
                                            "values; every item is generated once per combination; a name "
                                            "like model, size, n, quality, resolution, seed or mask_url sets "
                                            "that parameter")
    output: OutputSettings = Field(default_factory=OutputSettings, description="where images are written")
    run: RunSettings = Field(default_factory=RunSettings, description="how the job runs")
    quality: QualitySettings = Field(default_factory=QualitySettings, description="automatic checks on "
                                     "every downloaded image, and what a failed check does")
