"""The Evolink image models and what each accepts, as data, in one place.

Everything that needs to know about a model (manifest validation, credit estimates, the emulator's
validation, prices and latencies) reads it from here, so a new model or a changed rule is one edit.

Sizes, mask support and the 20 model names come from the API reference. The reference does not publish
prices or latencies: `credits_per_image` and the latency figures are the emulator's model of the service,
used for estimates and the emulator, and are labelled as estimates wherever they are shown to a user.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RATIO_SIZES: tuple[str, ...] = ("1:1", "16:9", "9:16", "2:3", "3:2", "4:3", "3:4", "4:5", "5:4", "21:9")
PIXEL_SIZES: tuple[str, ...] = ("1024x1024", "1024x1536", "1536x1024")

DEFAULT_MODEL = "gpt-image-1.5"
NANO_BANANA_2 = "gemini-3.1-flash-image-preview"

MAX_PROMPT_CHARS = 2000
MIN_N, MAX_N = 1, 4
MAX_IMAGE_URLS = 14
MAX_REFERENCE_IMAGE_BYTES = 4 * 1024 * 1024
REFERENCE_IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP")

# The reference's polling strategy, used when the API gives no estimated_time.
POLL_INITIAL_WAIT_S = 3.0
POLL_INTERVAL_S = (3.0, 5.0)
POLL_MAX_WAIT_S = 300.0
RESULT_URL_TTL_S = 24 * 3600.0
UPLOAD_TTL_S = 72 * 3600.0


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    capabilities: tuple[str, ...]
    beta: bool = False
    # GPT models take pixel sizes as well as ratios.
    pixel_sizes: bool = False
    # Editing-only models cannot run without at least one reference image.
    requires_images: bool = False
    supports_mask: bool = False
    credits_per_image: float = 1.0
    # Emulated generation latency: lognormal-ish around the median, clipped to [min, max].
    latency_median_s: float = 20.0
    latency_min_s: float = 5.0
    latency_max_s: float = 90.0
    sizes: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", RATIO_SIZES + (PIXEL_SIZES if self.pixel_sizes else ()))

    def accepts_size(self, size: str) -> bool:
        return size in self.sizes

    def credits_for(self, n_images: int) -> float:
        return round(self.credits_per_image * n_images, 4)


def _m(name: str, description: str, *caps: str, **kw: object) -> ModelInfo:
    return ModelInfo(name=name, description=description, capabilities=tuple(caps), **kw)  # type: ignore[arg-type]


_MODELS: tuple[ModelInfo, ...] = (
    # Stable (15)
    _m("gpt-image-1.5", "OpenAI GPT Image 1.5 — latest generation", "text-to-image", "image-editing",
       pixel_sizes=True, credits_per_image=4.0, latency_median_s=30.0, latency_min_s=10.0),
    _m("gpt-image-1", "OpenAI GPT Image 1 — high-quality generation", "text-to-image", "image-editing",
       pixel_sizes=True, credits_per_image=4.0, latency_median_s=35.0, latency_min_s=10.0),
    _m("gemini-3-pro-image-preview", "Google Gemini 3 Pro — image generation preview", "text-to-image",
       credits_per_image=6.0, latency_median_s=25.0),
    _m("z-image-turbo", "Z-Image Turbo — fastest generation", "text-to-image", "ultra-fast",
       credits_per_image=0.5, latency_median_s=5.0, latency_min_s=2.0,
       latency_max_s=20.0),
    _m("doubao-seedream-4.5", "ByteDance Seedream 4.5 — photorealistic", "text-to-image", "photorealistic",
       credits_per_image=2.5, latency_median_s=20.0),
    _m("doubao-seedream-4.0", "ByteDance Seedream 4.0 — high-quality", "text-to-image",
       credits_per_image=2.0, latency_median_s=20.0),
    _m("doubao-seedream-3.0-t2i", "ByteDance Seedream 3.0 — text-to-image", "text-to-image",
       credits_per_image=1.5, latency_median_s=15.0),
    _m("doubao-seededit-4.0-i2i", "ByteDance Seededit 4.0 — image-to-image editing", "image-editing",
       requires_images=True, credits_per_image=2.5, latency_median_s=20.0),
    _m("doubao-seededit-3.0-i2i", "ByteDance Seededit 3.0 — image-to-image editing", "image-editing",
       requires_images=True, credits_per_image=2.0, latency_median_s=20.0),
    _m("qwen-image-edit", "Alibaba Qwen — instruction-based editing", "image-editing", "instruction-based",
       requires_images=True, credits_per_image=2.0, latency_median_s=18.0),
    _m("qwen-image-edit-plus", "Alibaba Qwen Plus — advanced editing", "image-editing", "instruction-based",
       requires_images=True, credits_per_image=3.0, latency_median_s=22.0),
    _m("wan2.5-t2i-preview", "Alibaba WAN 2.5 — text-to-image preview", "text-to-image",
       credits_per_image=2.0, latency_median_s=25.0),
    _m("wan2.5-i2i-preview", "Alibaba WAN 2.5 — image-to-image preview", "image-editing",
       requires_images=True, credits_per_image=2.0, latency_median_s=25.0),
    _m("wan2.5-text-to-image", "Alibaba WAN 2.5 — text-to-image", "text-to-image",
       credits_per_image=2.0, latency_median_s=25.0),
    _m("wan2.5-image-to-image", "Alibaba WAN 2.5 — image-to-image", "image-editing",
       requires_images=True, credits_per_image=2.0, latency_median_s=25.0),
    # Beta (5)
    _m(NANO_BANANA_2, "Nano Banana 2 — Google Gemini 3.1 Flash image generation",
       "text-to-image", "image-editing", "fast", beta=True, credits_per_image=1.6, latency_median_s=10.0,
       latency_min_s=3.0, latency_max_s=45.0),
    _m("gpt-image-1.5-lite", "OpenAI GPT Image 1.5 Lite — fast lightweight", "text-to-image", "fast",
       beta=True, pixel_sizes=True, credits_per_image=2.0, latency_median_s=12.0),
    _m("gpt-4o-image", "OpenAI GPT-4o Image — best prompt understanding + editing",
       "text-to-image", "image-editing", "best-quality", beta=True, pixel_sizes=True, supports_mask=True,
       credits_per_image=5.0, latency_median_s=40.0, latency_min_s=15.0),
    _m("gemini-2.5-flash-image", "Google Gemini 2.5 Flash — fast image generation", "text-to-image", "fast",
       beta=True, credits_per_image=1.2, latency_median_s=10.0, latency_min_s=3.0, latency_max_s=45.0),
    _m("nano-banana-2-lite", "Nano Banana 2 Lite — lightweight fast generation", "text-to-image",
       "ultra-fast", beta=True, credits_per_image=0.8, latency_median_s=6.0,
       latency_min_s=2.0, latency_max_s=30.0),
)

MODELS: dict[str, ModelInfo] = {m.name: m for m in _MODELS}
assert len(MODELS) == 20, "the reference lists 20 image models"


def get(name: str) -> ModelInfo | None:
    return MODELS.get(name)


def combination_problems(model: str, size: str | None, has_mask: bool,
                         n_images: int) -> tuple[tuple[str, str], ...]:
    """(field, message) for every catalogue rule a request's model, size, mask and references break, all of
    them rather than the first, so a manifest's author fixes an item in one pass. An unknown model is the
    only problem reported for its request: what it accepts is unknown."""
    info = MODELS.get(model)
    if info is None:
        return (("model", f'model "{model}" is not in the catalogue; use one of '
                 + describe_choices(names(), limit=20)),)
    found: list[tuple[str, str]] = []
    if size is not None and not info.accepts_size(size):
        found.append(("size", f'size "{size}" is not accepted by {model}; use one of '
                      + describe_choices(info.sizes, limit=20)))
    if has_mask and not info.supports_mask:
        masked = [m.name for m in MODELS.values() if m.supports_mask]
        found.append(("mask_url", f"mask_url is not supported by {model}; only by {', '.join(masked)}"))
    if info.requires_images and not n_images:
        found.append(("image_urls", f"{model} is an editing model and needs at least one image_urls entry"))
    return tuple(found)


def names() -> list[str]:
    return list(MODELS)


def describe_choices(values: tuple[str, ...] | list[str], limit: int = 12) -> str:
    """'a, b, c, ...' for error messages that say what is allowed."""
    shown = ", ".join(values[:limit])
    return shown + (", ..." if len(values) > limit else "")
