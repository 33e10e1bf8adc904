"""Image preparation: every input becomes the expected upright 8-bit RGB pixels."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from llava_cli import synthetic
from llava_cli.errors import ImageError
from llava_cli.images import PreparedImage, load, prepare
from tests.conftest import llava, png_bytes

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


# Hostile inputs: bounded reads, only regular files, every decoder failure one ImageError.

PILLOW_IMAGES = Path(__file__).parent / "pillow_images"


def test_fifo_without_a_writer_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def attempt() -> None:
        try:
            load(str(fifo))
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)  # a hang must not hang the suite
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive(), "opening a FIFO with no writer blocked"
    assert len(outcome) == 1 and isinstance(outcome[0], ImageError)
    assert "is a FIFO (named pipe), not a regular file" in str(outcome[0])
    assert f"llava ask - < {fifo}" in outcome[0].hint


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom", "/dev/null"])
def test_devices_are_refused_without_reading(device: str) -> None:
    started = time.monotonic()
    with pytest.raises(ImageError, match="is a character device, not a regular file") as err:
        load(device)
    assert time.monotonic() - started < 1
    assert "llava ask -" in err.value.hint


def test_a_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.png"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        with pytest.raises(ImageError, match="is a socket, not a regular file"):
            load(str(path))


def test_a_sparse_file_over_the_limit_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.touch()
    os.truncate(path, 4 << 30)  # 4 GiB of nothing, on no disk
    started = time.monotonic()
    with pytest.raises(ImageError) as err:
        load(str(path))
    assert time.monotonic() - started < 1
    assert "is 4,294,967,296 bytes (4 GiB), over the limit of 268,435,456 bytes" in str(err.value)
    assert "--max-image-bytes / LLAVA_MAX_IMAGE_BYTES" in err.value.hint
    assert err.value.exit_code == 4


def test_the_byte_limit_is_inclusive(tmp_path: Path) -> None:
    data = encode(Image.new("RGB", (8, 8), RED), "PNG")
    path = tmp_path / "x.png"
    path.write_bytes(data)
    assert pixel(load(str(path), max_bytes=len(data)), 0, 0) == RED
    assert pixel(load("-", stdin=io.BytesIO(data), max_bytes=len(data)), 0, 0) == RED
    with pytest.raises(ImageError, match="over the limit"):
        load(str(path), max_bytes=len(data) - 1)
    with pytest.raises(ImageError, match="more than"):
        load("-", stdin=io.BytesIO(data), max_bytes=len(data) - 1)


class EndlessZeros(io.RawIOBase):
    """A stream with no end (``head -c 8G /dev/zero |`` and more) that counts what it gave."""

    def __init__(self) -> None:
        self.given = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        view[:] = bytes(len(view))
        self.given += len(view)
        return len(view)


def test_standard_input_over_the_limit_stops_at_the_limit() -> None:
    stream = EndlessZeros()
    limit = 10 << 20
    with pytest.raises(ImageError) as err:
        load("-", stdin=stream, max_bytes=limit)  # type: ignore[arg-type]
    assert stream.given == limit + 1  # read as it arrives: one byte past the limit, no more
    assert "standard input is more than 10,485,760 bytes (10 MiB)" in str(err.value)
    assert "--max-image-bytes" in err.value.hint


def test_a_symlink_to_an_image_is_read_and_one_to_a_device_is_not(tmp_path: Path) -> None:
    target = tmp_path / "real.png"
    Image.new("RGB", (4, 4), BLUE).save(target)
    (tmp_path / "link.png").symlink_to(target)
    assert pixel(load(str(tmp_path / "link.png")), 1, 1) == BLUE
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    with pytest.raises(ImageError, match="character device"):
        load(str(tmp_path / "zero.png"))


def test_a_nul_byte_in_the_path_is_bad_input() -> None:
    with pytest.raises(ImageError, match="NUL byte"):
        load("x\0.png")


NOT_OSERROR = [
    "unimplemented_pixel_format.dds",
    "unimplemented_pfflags.dds",
    "decompression_bomb.ico",
]


@pytest.mark.parametrize("name", NOT_OSERROR)
def test_decoder_exceptions_of_any_kind_are_bad_input(name: str) -> None:
    # Pillow raises NotImplementedError (DDS) and ValueError (ICO) for these, not OSError.
    with pytest.raises(ImageError, match="is not a readable image") as err:
        load(str(PILLOW_IMAGES / name))
    assert err.value.exit_code == 4


def test_libtiff_chatter_never_reaches_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    # Without the capture, libtiff prints "WEBP compression support is not configured" to
    # file descriptor 2 three times, then Pillow says only "decoder error -2".
    with pytest.raises(ImageError) as err:
        load(str(PILLOW_IMAGES / "hopper_webp.tif"))
    assert "cannot be decoded (WEBP compression support is not configured)" in str(err.value)
    assert capfd.readouterr().err == ""
    os.write(2, b"stderr is back\n")  # and file descriptor 2 is restored
    assert capfd.readouterr().err == "stderr is back\n"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_band_by_band_conversion_matches_pillows_whole_image(
    orientation: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import ImageOps

    from llava_cli import images

    stored = Image.effect_noise((37, 23), 80).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "PNG", exif=exif)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    monkeypatch.setattr(images, "_BAND_PIXELS", 50)  # bands of one or two rows, a short last one
    image = prepare("noise.png", data)
    assert (image.width, image.height) == expected.size
    assert image.rgb == expected.tobytes()


@pytest.mark.parametrize("mode", ["RGBA", "I;16", "P", "CMYK", "F"])
def test_conversions_are_the_same_in_bands(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from llava_cli import images

    im = Image.effect_noise((29, 17), 90).convert(mode if mode not in ("I;16", "F") else "L")
    if mode == "I;16":
        im = im.point(lambda v: v * 200).convert("I;16")
    elif mode == "F":
        im = im.convert("F")
    fmt, kw = ("TIFF", {}) if mode in ("CMYK", "F") else ("PNG", {})
    if mode == "P":
        kw = {"transparency": 3}
    data = encode(im, fmt, **kw)
    whole = prepare("whole", data)
    monkeypatch.setattr(images, "_BAND_PIXELS", 40)
    assert prepare("banded", data).rgb == whole.rgb


@pytest.mark.slow
def test_decoding_holds_few_copies_of_the_pixels(tmp_path: Path) -> None:
    # Peak memory of one 9-megapixel RGBA decode, in a fresh process: the picture as Pillow
    # holds it (4 bytes a pixel) and the RGB result (3) are unavoidable; a whole-image chain
    # of conversions held 19 bytes a pixel (1.9 GB at the default 100-megapixel limit).
    path = tmp_path / "big.png"
    Image.new("RGBA", (3000, 3000), (10, 200, 30, 128)).save(path, compress_level=1)
    script = (
        "import sys\n"
        "from llava_cli.images import load\n"
        "from PIL import Image\n"
        "Image.init()\n"
        "rss = lambda: int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])\n"
        "before = rss()\n"
        "load(sys.argv[1])\n"
        # VmHWM, not ru_maxrss: that one keeps the peak of the (big) process that forked us
        "print(int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) - before)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True
    )
    peak_bytes = int(done.stdout) * 1024
    assert peak_bytes / (3000 * 3000) < 12


# Pictures within --max-pixels that would still exhaust memory downstream: thin strips are
# refused from the header, large ones scaled down to what a vision model can look at.


def _rows(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """Raw 8-bit RGB PNG scanlines (filter byte 0) of one colour, for ``png_bytes``."""
    return (b"\x00" + bytes(rgb) * width) * height


@pytest.mark.parametrize(("width", "height"), [(1, 99_000_000), (99_000_000, 1), (2, 2049)])
def test_thin_strips_are_refused_from_the_header(width: int, height: int) -> None:
    # Only the header is real: the refusal must come before a byte of pixels is decoded (the
    # 1 x 99,000,000 strip took 1.5 GB to decode, then ran libmtmd out of 4 GB).
    started = time.monotonic()
    with pytest.raises(ImageError) as err:
        prepare("strip.png", png_bytes(width, height, 8, 2, b"\x00" * 8))
    assert time.monotonic() - started < 1
    assert str(err.value).startswith(f"strip.png is {width}x{height}: one side is over 1024 ")
    assert "crop it into parts" in err.value.hint
    assert err.value.exit_code == 4


@pytest.mark.parametrize(("width", "height"), [(1, 1024), (1024, 1), (4, 4096), (4096, 4)])
def test_strips_within_the_ratio_keep_every_pixel(width: int, height: int) -> None:
    image = prepare("strip.png", png_bytes(width, height, 8, 2, _rows(width, height, BLUE)))
    assert (image.width, image.height, image.scaled_from) == (width, height, None)
    assert image.rgb == bytes(BLUE) * (width * height)
    assert image.describe() == f"{width}x{height} PNG RGB"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("width", "height", "scaled"),
    [(8192, 8, (4096, 4)), (8, 8192, (4, 4096)), (10_000, 3_001, (4096, 1229))],
)
def test_large_pictures_are_scaled_to_the_longest_side(
    width: int, height: int, scaled: tuple[int, int]
) -> None:
    image = prepare("big.png", png_bytes(width, height, 8, 2, _rows(width, height, RED)))
    assert (image.width, image.height) == scaled
    assert image.rgb == bytes(RED) * (scaled[0] * scaled[1])  # one colour stays that colour
    assert image.scaled_from == (width, height)
    assert image.describe() == f"{width}x{height} PNG RGB, scaled to {scaled[0]}x{scaled[1]}"
    # The key is of the pixels the model gets, so the prefix cache keys what it holds.
    assert image.key == hashlib.sha256(f"{scaled[0]}x{scaled[1]}:".encode() + image.rgb).hexdigest()


def test_a_large_jpeg_is_decoded_at_a_reduced_scale() -> None:
    # JPEG's draft mode decodes at 1/2 here (8200 // 4096); the result is still the size and
    # colour a full decode and Lanczos would give.
    data = encode(Image.new("RGB", (8200, 64), (30, 160, 40)), "JPEG", quality=95)
    image = prepare("wide.jpg", data)
    assert (image.width, image.height, image.scaled_from) == (4096, 32, (8200, 64))
    assert _close(pixel(image, 2000, 16), (30, 160, 40), tol=4)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "I;16"])
def test_scaling_in_bands_matches_pillows_two_passes(
    orientation: int, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import ImageOps

    from llava_cli import images

    stored = Image.effect_noise((61, 23), 80).convert("L")
    stored = {
        "RGB": Image.merge("RGB", (stored, stored.rotate(90), stored.rotate(180))),
        "RGBA": Image.merge("RGBA", (stored, stored, stored.rotate(180), stored.rotate(90))),
        "I;16": stored.point(lambda v: v * 200).convert("I;16"),
    }[mode]
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "PNG", exif=exif)
    monkeypatch.setattr(images, "MAX_IMAGE_SIDE", 20)
    monkeypatch.setattr(images, "_BAND_PIXELS", 70)  # bands of one to three rows
    image = prepare("noise.png", data)
    # The reference: the whole picture made upright RGB by the unscaled path, then Pillow's
    # own resize, across first and then down, as its resampler does.
    monkeypatch.setattr(images, "MAX_IMAGE_SIDE", 1000)
    whole = prepare("noise.png", data)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert (whole.width, whole.height) == upright.size
    full = Image.frombytes("RGB", upright.size, whole.rgb)
    size = (20, 8) if upright.width > upright.height else (8, 20)
    lanczos = Image.Resampling.LANCZOS
    expected = full.resize((size[0], full.height), lanczos, reducing_gap=3.0)
    expected = expected.resize(size, lanczos, reducing_gap=3.0)
    assert (image.width, image.height, image.scaled_from) == (*size, upright.size)
    assert image.rgb == expected.tobytes()


@pytest.mark.slow
def test_scaling_a_tall_picture_holds_few_copies_of_it() -> None:
    # 100 x 100,000 (10 megapixels, 1000:1): Pillow holds it at 4 bytes a pixel; the RGB
    # conversion and the scaling add bands and a narrow picture, not whole copies.
    width, height = 100, 100_000
    data = png_bytes(width, height, 8, 2, _rows(width, height, (9, 99, 199)))
    script = (
        "import sys\n"
        "from llava_cli.images import prepare\n"
        "from PIL import Image\n"
        "Image.init()\n"
        "data = sys.stdin.buffer.read()\n"
        "rss = lambda: int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])\n"
        "before = rss()\n"
        "image = prepare('tall.png', data)\n"
        "assert (image.width, image.height) == (4, 4096), image.describe()\n"
        "print(int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) - before)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], input=data, capture_output=True, check=True
    )
    peak_bytes = int(done.stdout) * 1024
    assert peak_bytes / (width * height) < 6.5


_OUT_OF_MEMORY = """
import io, os, resource, sys
from llava_cli import synthetic
from llava_cli.errors import ImageError
from llava_cli.images import load
size = int(open('/proc/self/status').read().split('VmSize:')[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + (256 << 20), resource.RLIM_INFINITY))
class Zeros(io.RawIOBase):
    def readable(self): return True
    def readinto(self, b):
        n = len(b); b[:n] = bytes(n); return n
for source, stdin in ((sys.argv[1], None), ('-', Zeros())):
    try:
        load(source, stdin=stdin, max_bytes=2 << 30)
    except ImageError as exc:
        print(exc.exit_code, exc.one_line())
"""


@pytest.mark.slow
def test_a_byte_limit_above_the_memory_there_is_is_bad_input(tmp_path: Path) -> None:
    # --max-image-bytes raised past what the process may allocate: a 1 GiB sparse file and an
    # endless stdin under a 256 MiB allowance end in ImageError, not MemoryError.
    path = tmp_path / "s.png"
    path.touch()
    os.truncate(path, 1 << 30)
    done = subprocess.run(
        [sys.executable, "-c", _OUT_OF_MEMORY, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    limit = "--max-image-bytes allows up to 2,147,483,648 bytes (2 GiB)"
    hint = "lower --max-image-bytes / LLAVA_MAX_IMAGE_BYTES (the default is 256 MiB)"
    assert done.stdout.splitlines() == [
        f"4 not enough memory to read image {path}: {limit} — {hint}, or free some memory",
        f"4 not enough memory to read standard input: {limit} — {hint}, or free some memory",
    ]


@pytest.mark.slow
def test_a_scaled_picture_still_answers(oracle: synthetic.ModelPair, tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(4400, 3300, 8, 2, _rows(4400, 3300, (230, 20, 20))))
    args: list[str | Path] = [
        "-p",
        "What colour?",
        "--model",
        oracle.model,
        "--mmproj",
        oracle.mmproj,
    ]
    result = llava("ask", path, *args)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"red\n", b"")
    verbose = llava("ask", path, *args, "--verbose")
    assert verbose.stdout == b"red\n"
    assert f"image {path}: 4400x3300 PNG RGB, scaled to 4096x3072, ".encode() in verbose.stderr
