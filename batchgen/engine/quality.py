"""Automatic quality checks on a downloaded image: is it something anyone could have asked for?

Generators sometimes hand back a blank or near-uniform frame, a placeholder, an image in the wrong aspect
ratio or a tiny one. Each is paid for and each is useless to a catalogue, so every image is checked the
moment its bytes arrive, before it gets its name in the output folder (the scheduler's download path).
The checks are pure functions of the bytes (or a decoded Pillow image) and the requested size:

* ``decode``  — the image decodes completely (a truncated PNG or JPEG fails here, not later in a shop);
* ``size``    — its short side is at least ``min_side_px``;
* ``aspect``  — width/height matches the requested size within ``aspect_tolerance`` (relative): a ratio
  ("16:9") or pixels ("1024x1536"). Without a size the model's default applies; the API reference does not
  publish the models' defaults, so an image of a request without a size is not aspect-checked;
* ``blank``   — not near-uniform: the luminance spread (standard deviation, 0–255) is at least
  ``min_luminance_spread``, and no single colour covers more than ``max_dominant_share`` of the pixels.

Why no NumPy: Pillow's C code does each step (a histogram for the spread, ``getcolors`` for the dominant
colour, which gives up early on images with many colours) on a copy box-reduced to at most ``ANALYSE_PX``
on its long side. Measured on a 1024 x 1024 image: about 1 ms of analysis next to 3 ms (JPEG) to 33 ms
(PNG) for the decode every check needs anyway (docs/benchmarks.md); NumPy would add a large dependency to
save nothing measurable. Reducing first also makes the share test robust to JPEG noise on a flat frame.
"""

from __future__ import annotations

import io
import math
import operator
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from batchgen.models import QualitySettings

ANALYSE_PX = 128  # long side of the reduced copy the blank check looks at


@dataclass(frozen=True)
class Failure:
    check: str  # decode, size, aspect, blank
    message: str

    def __str__(self) -> str:
        return f"{self.check}: {self.message}"


@dataclass(frozen=True)
class Verdict:
    """What the checks found. `checked` False when checks are off (then nothing is recorded as passed)."""

    checked: bool = True
    failures: tuple[Failure, ...] = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def status(self) -> str | None:
        """What the store records on the image: "passed", "failed", or None when not checked."""
        if not self.checked:
            return None
        return "passed" if self.passed else "failed"

    @property
    def reasons(self) -> str:
        return "; ".join(str(f) for f in self.failures)


NOT_CHECKED = Verdict(checked=False)


def expected_ratio(size: str | None) -> float | None:
    """width/height the requested size asks for; None when there is none to compare with."""
    if not size:
        return None
    sep = ":" if ":" in size else ("x" if "x" in size else None)
    if sep is None:
        return None
    try:
        w, h = (float(part) for part in size.split(sep, 1))
    except ValueError:
        return None
    return w / h if w > 0 and h > 0 else None


def check_size(width: int, height: int, settings: QualitySettings) -> Failure | None:
    if min(width, height) < settings.min_side_px:
        return Failure("size", f"{width}x{height} is smaller than the minimum of {settings.min_side_px} px "
                       "on the short side")
    return None


def check_aspect(width: int, height: int, size: str | None, settings: QualitySettings) -> Failure | None:
    want = expected_ratio(size)
    if want is None or height <= 0:
        return None
    got = width / height
    if abs(got - want) / want > settings.aspect_tolerance:
        return Failure("aspect", f"{width}x{height} has aspect ratio {got:.3f}, the requested {size} is "
                       f"{want:.3f} (tolerance {settings.aspect_tolerance:.0%})")
    return None


_LEVELS = tuple(range(256))
_SQUARES = tuple(i * i for i in range(256))


def luminance_spread(histogram: list[int]) -> float:
    """Standard deviation of the levels counted in a 256-bin histogram (ImageStat's `stddev`, without its
    per-bin Python loops, which were most of the cost of checking a small image)."""
    count = sum(histogram)
    if not count:
        return 0.0
    mean = sum(map(operator.mul, histogram, _LEVELS)) / count
    var = sum(map(operator.mul, histogram, _SQUARES)) / count - mean * mean
    return math.sqrt(var) if var > 0 else 0.0


def check_blank(img: Image.Image, settings: QualitySettings) -> Failure | None:
    """Near-uniform frames: low luminance spread, or one colour covering almost everything."""
    factor = max(1, max(img.size) // ANALYSE_PX)
    # Box-reduce first (in C, in the image's own mode), then convert the small copy: converting the full
    # image first cost 5x more.
    small = img.reduce(factor) if factor > 1 and img.mode in ("RGB", "RGBA", "L", "LA") else img
    small = small.convert("RGB")
    if max(small.size) > ANALYSE_PX:
        small.thumbnail((ANALYSE_PX, ANALYSE_PX), Image.Resampling.BOX)
    spread = luminance_spread(small.convert("L").histogram())
    if spread < settings.min_luminance_spread:
        return Failure("blank", f"near-uniform image (luminance spread {spread:.1f}, minimum "
                       f"{settings.min_luminance_spread:g})")
    pixels = small.width * small.height
    # If one colour covers more than the share, the others cover the rest, so there are at most this many
    # colours; getcolors gives up (None) past it, which keeps a photo with thousands of colours cheap.
    most = 1 + int((1.0 - settings.max_dominant_share) * pixels)
    colours = small.getcolors(maxcolors=most)
    if colours is None:
        return None
    share = max(count for count, _ in colours) / pixels
    if share > settings.max_dominant_share:
        return Failure("blank", f"one colour covers {share:.1%} of the image (maximum "
                       f"{settings.max_dominant_share:.1%})")
    return None


def check_image(img: Image.Image, size: str | None, settings: QualitySettings) -> Verdict:
    """Every check but decoding, on an image that is already decoded."""
    width, height = img.size
    found = [check_size(width, height, settings), check_aspect(width, height, size, settings)]
    found.append(check_blank(img, settings))
    return Verdict(failures=tuple(f for f in found if f is not None))


def check_bytes(data: bytes, size: str | None, settings: QualitySettings) -> Verdict:
    """Decode `data` completely and run every check. CPU-bound: call it in a worker thread."""
    if not settings.enabled:
        return NOT_CHECKED
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # the whole image: a truncated file raises here
            return check_image(img, size, settings)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return Verdict(failures=(Failure("decode", f"the image does not decode completely "
                                         f"({type(error).__name__}: {error})"),))
