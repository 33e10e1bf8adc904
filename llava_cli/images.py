"""The only Pillow decoder: read, verify, orient, flatten, limit and hash an image.

Whatever comes in (JPEG, PNG, WebP, GIF, BMP, TIFF; CMYK, 16-bit, palette, greyscale, alpha),
what comes out is 8-bit RGB pixels, upright, on white where it was transparent. libmtmd gets
those raw pixels (``mtmd_bitmap_init``): lossless, and no second decode of a compressed file.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from .errors import ImageError

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_MAX_PIXELS = 100_000_000
SUPPORTED = "JPEG, PNG, WebP, GIF, BMP, TIFF"
_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO", "DIB")


@dataclass(frozen=True)
class PreparedImage:
    source: str  # the path as given, or "-" for stdin
    sha256: str  # of the source bytes
    format: str  # as Pillow detected it
    mode: str  # the source colour mode, before conversion
    width: int
    height: int
    rgb: bytes  # width * height * 3 bytes
    key: str  # identifies the pixels: the same picture in another file has the same key

    def describe(self) -> str:
        return f"{self.width}x{self.height} {self.format} {self.mode}"


def read_source(source: str, stdin: BinaryIO | None = None) -> bytes:
    """The bytes of ``source``: a file path, or ``-`` for standard input."""
    if source == "-":
        if stdin is None and (sys.stdin is None or sys.stdin.isatty()):
            raise ImageError(
                "'-' reads an image from standard input, but nothing is piped in",
                "pipe an image in: cat x.png | llava ask -",
            )
        data = (stdin or sys.stdin.buffer).read()
        if not data:
            raise ImageError(
                "no image data on standard input", "pipe an image in: cat x.png | llava ask -"
            )
        return data
    path = Path(source)
    try:
        if path.is_dir():
            raise ImageError(f"{source} is a directory, not an image", "pass image files")
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"image {source} does not exist", "check the path") from None
    except PermissionError:
        raise ImageError(f"cannot read image {source}: permission denied") from None
    except OSError as exc:
        raise ImageError(f"cannot read image {source}: {exc.strerror or exc}") from None
    if not data:
        raise ImageError(f"image {source} is empty", "pass a complete image file")
    return data


def prepare(source: str, data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> PreparedImage:
    """Decode ``data`` into upright 8-bit RGB, refusing anything over ``max_pixels``."""
    import logging
    import warnings

    # Pillow reports oddities of a file (unknown TIFF tags, palette notes) through logging and
    # warnings; stderr is ours. Failures still raise and become one ImageError line.
    logging.getLogger("PIL").setLevel(logging.CRITICAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _prepare(source, data, max_pixels)


def _prepare(source: str, data: bytes, max_pixels: int) -> PreparedImage:
    import io

    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # we enforce our own, configurable limit below
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(
            f"{source} is not an image this tool can read", f"use one of {SUPPORTED}"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{source} is not a readable image ({exc})", f"use {SUPPORTED}") from None
    with im:
        fmt = im.format or "unknown"
        if fmt not in _FORMATS:
            raise ImageError(
                f"{source} is a {fmt} image, which is not supported", f"use {SUPPORTED}"
            )
        width, height = im.size
        if width * height > max_pixels:
            raise ImageError(
                f"{source} is {width}x{height} = {width * height:,} pixels, over the limit of "
                f"{max_pixels:,} (a decompression bomb?)",
                "downscale it, or raise the limit with --max-pixels / LLAVA_MAX_PIXELS",
            )
        mode = im.mode
        try:
            im.seek(0)  # first frame of an animation
            im.load()
            rgb = to_rgb(im)
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageError(
                f"{source} is truncated or corrupt ({exc})", "re-export or re-download the image"
            ) from None
    pixels = rgb.tobytes()
    key = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    key.update(pixels)
    return PreparedImage(
        source=source,
        sha256=hashlib.sha256(data).hexdigest(),
        format=fmt,
        mode=mode,
        width=rgb.width,
        height=rgb.height,
        rgb=pixels,
        key=key.hexdigest(),
    )


def load(
    source: str, *, max_pixels: int = DEFAULT_MAX_PIXELS, stdin: BinaryIO | None = None
) -> PreparedImage:
    return prepare(source, read_source(source, stdin), max_pixels=max_pixels)


def to_rgb(im: Image.Image) -> Image.Image:
    """Upright 8-bit RGB: EXIF orientation applied, alpha flattened onto white."""
    from PIL import Image, ImageOps

    oriented = ImageOps.exif_transpose(im)
    if oriented is not None:
        im = oriented
    if im.mode.startswith("I;16") or im.mode == "I":
        # 16-bit samples: scale to 8 bits (Pillow's own conversion clips at 255 instead).
        im = im.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    elif im.mode == "F":
        im = im.convert("L")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    if im.mode == "CMYK" and im.info.get("icc_profile"):
        converted = _icc_to_srgb(im)
        if converted is not None:
            return converted
    return im.convert("RGB")


def _icc_to_srgb(im: Image.Image) -> Image.Image | None:
    """Convert through the embedded ICC profile; None if littleCMS cannot."""
    import io

    from PIL import ImageCms

    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(im.info["icc_profile"]))
        out = ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return None
    return out


def thumbnail(image: PreparedImage, size: int = 16) -> tuple[int, int, bytes]:
    """A small RGB copy for a terminal preview: at most ``size`` pixels a side (so ``size``
    columns and ``size / 2`` text rows), an even number of rows."""
    from PIL import Image

    scale = min(1.0, size / image.width, size / image.height)
    width = max(1, round(image.width * scale))
    height = max(2, round(image.height * scale / 2) * 2)  # two pixel rows per text row
    small = Image.frombytes("RGB", (image.width, image.height), image.rgb)
    small = small.resize((width, height), Image.Resampling.BOX)
    return width, height, small.tobytes()
