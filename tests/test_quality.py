"""The automatic image checks as pure functions: each catches what it is for (blank, near-uniform, wrong
aspect, tiny, truncated), none fires on the emulator's ordinary images of every size, and the `quality:`
section of a manifest is validated strictly."""

from __future__ import annotations

import io
import random

import pytest
import yaml
from PIL import Image, ImageDraw

from batchgen import catalog
from batchgen.emulator.images import render_png
from batchgen.engine.quality import check_bytes, expected_ratio
from batchgen.errors import ManifestError
from batchgen.manifest.load import load_job
from batchgen.models import QualitySettings

DEFAULTS = QualitySettings()


def png(img: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


def checks(data: bytes, size: str | None = "1:1", **settings: object) -> list[str]:
    verdict = check_bytes(data, size, QualitySettings(**settings) if settings else DEFAULTS)
    return [f.check for f in verdict.failures]


def test_ratios_from_sizes() -> None:
    assert expected_ratio("16:9") == pytest.approx(16 / 9)
    assert expected_ratio("1024x1536") == pytest.approx(2 / 3)
    assert expected_ratio(None) is None and expected_ratio("auto") is None


def test_the_emulators_ordinary_images_pass_every_check() -> None:
    rng = random.Random(5)
    sizes = [*catalog.RATIO_SIZES, *catalog.PIXEL_SIZES, None]
    for i in range(1500):
        size = rng.choice(sizes)
        data = render_png(f"a prompt {rng.random()}", size, rng.randrange(4))
        assert checks(data, size) == [], (i, size)


@pytest.mark.parametrize("size", ["1:1", "16:9", "9:16", "4:5", "1024x1536"])
@pytest.mark.parametrize(("fault", "check"), [("blank", "blank"), ("wrong_aspect", "aspect"), ("tiny", "size")])
def test_the_emulators_bad_images_fail_the_right_check(size: str, fault: str, check: str) -> None:
    assert check in checks(render_png("x", size, 0, fault), size)


def test_near_uniform_and_dominant_colour() -> None:
    flat = Image.new("RGB", (512, 512), (200, 200, 200))
    assert checks(png(flat)) == ["blank"]
    assert checks(png(flat, "JPEG")) == ["blank"]  # JPEG noise on a flat frame is still blank
    # A placeholder: a flat frame with a small mark still counts as one colour covering almost everything.
    mark = flat.copy()
    ImageDraw.Draw(mark).rectangle((250, 250, 260, 260), fill=(0, 0, 0))
    assert checks(png(mark)) == ["blank"]
    # A real picture: many colours, a wide spread.
    rng = random.Random(1)
    busy = Image.new("RGB", (512, 512))
    draw = ImageDraw.Draw(busy)
    for _ in range(300):
        x, y = rng.randrange(512), rng.randrange(512)
        draw.ellipse((x, y, x + 40, y + 40), fill=(rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    assert checks(png(busy)) == []
    # The thresholds are the user's: a looser share lets the placeholder through.
    assert checks(png(mark), max_dominant_share=1.0) == []


def test_aspect_tolerance_and_missing_size() -> None:
    img = png(Image.effect_noise((1000, 1000), 60).convert("RGB"))
    assert checks(img, "1:1") == []
    assert checks(img, "16:9") == ["aspect"]
    assert checks(img, None) == []  # the models' default size is not published: not checked
    near = png(Image.effect_noise((1040, 1000), 60).convert("RGB"))  # 4% off
    assert checks(near, "1:1") == [] and checks(near, "1:1", aspect_tolerance=0.01) == ["aspect"]


def test_tiny_and_truncated() -> None:
    small = png(Image.effect_noise((40, 40), 60).convert("RGB"))
    assert checks(small) == ["size"] and checks(small, min_side_px=32) == []
    whole = png(Image.effect_noise((300, 300), 60).convert("RGB"), "JPEG")
    assert checks(whole[: len(whole) // 2]) == ["decode"]


def test_checks_off() -> None:
    verdict = check_bytes(b"anything", "1:1", QualitySettings(enabled=False))
    assert verdict.status is None and verdict.passed


def test_the_quality_section_is_validated(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "job.yaml"
    base = {"prompt": "a {id}", "items": [{"id": "a"}]}
    path.write_text(yaml.safe_dump({**base, "quality": {"on_fail": "keep", "min_side_px": 256}}))
    job = load_job(path)
    assert job.quality.on_fail == "keep" and job.quality.min_side_px == 256 and job.quality.enabled
    path.write_text(yaml.safe_dump(base))
    assert load_job(path).quality == QualitySettings()  # on by default
    path.write_text(yaml.safe_dump({**base, "quality": {"on_fail": "delete", "aspect_tolerance": 2,
                                                        "treshold": 1}}))
    with pytest.raises(ManifestError) as info:
        load_job(path)
    text = str(info.value)
    assert "quality.on_fail" in text and "'regenerate' or 'keep'" in text
    assert "quality.aspect_tolerance" in text and "quality.treshold: unknown key" in text


def test_the_luminance_spread_is_the_standard_deviation_of_the_levels() -> None:
    from PIL import ImageStat

    from batchgen.engine.quality import luminance_spread

    rnd = random.Random(7)
    for _ in range(25):
        img = Image.new("L", (rnd.randint(1, 60), rnd.randint(1, 60)))
        flat = rnd.randint(0, 255)
        img.putdata([rnd.randint(0, 255) if rnd.random() < 0.3 else flat for _ in range(img.width * img.height)])
        assert luminance_spread(img.histogram()) == pytest.approx(ImageStat.Stat(img).stddev[0], abs=1e-6)
    assert luminance_spread(Image.new("L", (8, 8), 200).histogram()) == 0.0
