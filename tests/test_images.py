"""Image preparation: every input becomes the expected upright 8-bit RGB pixels."""

from __future__ import annotations

import hashlib
import io
import struct
from pathlib import Path

import pytest
from PIL import Image

from llava_cli.errors import ImageError
from llava_cli.images import PreparedImage, load, prepare
from tests.conftest import png_bytes

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def pixel(image: PreparedImage, x: int, y: int) -> tuple[int, int, int]:
    i = (y * image.width + x) * 3
    r, g, b = image.rgb[i : i + 3]
    return (r, g, b)


def test_exif_orientation_is_applied() -> None:
    stored = Image.new("RGB", (20, 10), RED)
    stored.paste(BLUE, (10, 0, 20, 10))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    image = prepare("rotated.jpg", encode(stored, "JPEG", exif=exif, quality=95))
    assert (image.width, image.height) == (10, 20)
    # The stored left column becomes the displayed top row.
    assert _close(pixel(image, 5, 2), RED)
    assert _close(pixel(image, 5, 17), BLUE)


def test_cmyk_becomes_rgb() -> None:
    image = prepare("cmyk.tif", encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "TIFF"))
    assert image.mode == "CMYK"
    assert pixel(image, 3, 3) == RED


def test_16_bit_greyscale_is_scaled_not_clipped() -> None:
    rows = b"".join(b"\x00" + struct.pack(">H", 32768) * 4 for _ in range(4))
    image = prepare("grey16.png", png_bytes(4, 4, 16, 0, rows))
    assert image.mode.startswith("I")
    assert pixel(image, 1, 1) == (128, 128, 128)


def test_16_bit_rgb_keeps_its_colours() -> None:
    sample = struct.pack(">HHH", 65535, 0, 32768)
    rows = b"".join(b"\x00" + sample * 4 for _ in range(4))
    image = prepare("rgb16.png", png_bytes(4, 4, 16, 2, rows))
    assert pixel(image, 2, 2) == (255, 0, 128)


def test_palette_with_transparency_is_flattened_onto_white() -> None:
    im = Image.new("P", (4, 4), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    im.putpixel((3, 3), 1)
    data = encode(im, "PNG", transparency=0)  # index 0 (red) is fully transparent
    image = prepare("palette.png", data)
    assert pixel(image, 0, 0) == WHITE
    assert pixel(image, 3, 3) == BLUE


def test_partial_alpha_is_composited_onto_white() -> None:
    image = prepare("rgba.png", encode(Image.new("RGBA", (4, 4), (255, 0, 0, 128)), "PNG"))
    r, g, b = pixel(image, 0, 0)
    assert r == 255 and 125 <= g <= 129 and g == b


def test_animated_gif_uses_its_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    image = prepare("anim.gif", buf.getvalue())
    assert _close(pixel(image, 4, 4), RED)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"])
def test_supported_formats_decode(fmt: str) -> None:
    data = encode(Image.new("L", (6, 5), 200), fmt)
    image = prepare(f"x.{fmt.lower()}", data)
    assert (image.width, image.height) == (6, 5)
    assert len(image.rgb) == 6 * 5 * 3
    assert _close(pixel(image, 2, 2), (200, 200, 200))
    assert image.sha256 == hashlib.sha256(data).hexdigest()


def test_key_identifies_pixels_not_files() -> None:
    im = Image.new("RGB", (8, 8), BLUE)
    png = prepare("a.png", encode(im, "PNG"))
    bmp = prepare("a.bmp", encode(im, "BMP"))
    assert png.sha256 != bmp.sha256
    assert png.key == bmp.key
    assert png.key != prepare("b.png", encode(Image.new("RGB", (8, 8), RED), "PNG")).key


def test_pixel_limit_refuses_before_decoding() -> None:
    bomb = png_bytes(50_000, 50_000, 8, 2, b"\x00" * 10)  # claims 2.5 gigapixels
    with pytest.raises(ImageError, match="over the limit"):
        prepare("bomb.png", bomb)
    with pytest.raises(ImageError, match="max-pixels"):
        prepare("small.png", encode(Image.new("RGB", (40, 40)), "PNG"), max_pixels=1000)


def test_unicode_and_spaces_in_paths(tmp_path: Path) -> None:
    path = tmp_path / "ein Bild – ünïcödé 画像.png"
    Image.new("RGB", (4, 4), RED).save(path)
    assert pixel(load(str(path)), 0, 0) == RED


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.png", b"", "is empty"),
        ("notes.jpg", b"just some text, not a picture\n", "not an image"),
        ("cut.png", None, "truncated or corrupt"),
    ],
)
def test_bad_files(tmp_path: Path, name: str, content: bytes | None, message: str) -> None:
    if content is None:
        full = encode(Image.effect_noise((64, 64), 60).convert("RGB"), "PNG")
        content = full[: len(full) // 2]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError, match=message):
        load(str(path))


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="does not exist"):
        load(str(tmp_path / "nope.png"))
    with pytest.raises(ImageError, match="is a directory"):
        load(str(tmp_path))


def _close(a: tuple[int, int, int], b: tuple[int, int, int], tol: int = 12) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))
