"""Local reference images: existence, format by content (not extension), and the 4 MB limit."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from batchgen import catalog
from batchgen.manifest.localfiles import ReferenceChecker, check_reference_image, sniff_format


def image_bytes(fmt: str, size: tuple[int, int] = (8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(("fmt", "name"), [("PNG", "PNG"), ("JPEG", "JPEG"), ("WEBP", "WEBP")])
def test_accepted_formats(tmp_path: Path, fmt: str, name: str) -> None:
    path = tmp_path / "photo.bin"  # the extension says nothing: content decides
    path.write_bytes(image_bytes(fmt))
    assert check_reference_image(path) == name
    assert sniff_format(path.read_bytes()[:32]) == name


def test_extension_does_not_make_an_image(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(image_bytes("GIF"))
    with pytest.raises(ValueError, match="GIF; use a JPEG, PNG or WebP"):
        check_reference_image(path)


def test_text_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("hello, not an image")
    with pytest.raises(ValueError, match="not a JPEG, PNG or WebP"):
        check_reference_image(path)


def test_truncated_image_with_right_magic_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(ValueError, match="not a readable image"):
        check_reference_image(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        check_reference_image(tmp_path / "nope.png")


def test_folder_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a file"):
        check_reference_image(tmp_path)


def test_oversized_file(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    data = image_bytes("PNG")
    path.write_bytes(data + b"\x00" * (catalog.MAX_REFERENCE_IMAGE_BYTES + 1 - len(data)))
    with pytest.raises(ValueError, match="at most 4 MB"):
        check_reference_image(path)


def test_exactly_the_limit_is_allowed(tmp_path: Path) -> None:
    path = tmp_path / "edge.png"
    data = image_bytes("PNG")
    path.write_bytes(data + b"\x00" * (catalog.MAX_REFERENCE_IMAGE_BYTES - len(data)))
    assert check_reference_image(path) == "PNG"


def test_mask_must_be_png(tmp_path: Path) -> None:
    path = tmp_path / "mask.jpg"
    path.write_bytes(image_bytes("JPEG"))
    with pytest.raises(ValueError, match="must be a PNG"):
        check_reference_image(path, mask=True)
    png = tmp_path / "mask.png"
    png.write_bytes(image_bytes("PNG"))
    assert check_reference_image(png, mask=True) == "PNG"


def test_checker_caches_per_path(tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    path.write_bytes(image_bytes("PNG"))
    checker = ReferenceChecker()
    assert checker.error_for(path) is None
    path.unlink()  # a cached answer is not re-checked within one expansion
    assert checker.error_for(path) is None
    assert "does not exist" in (checker.error_for(tmp_path / "other.png") or "")
    assert checker.checked_paths() == sorted([str(path), str(tmp_path / "other.png")])
