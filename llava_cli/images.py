"""The only Pillow decoder: read, verify, orient, flatten, limit and hash an image.

Whatever comes in (JPEG, PNG, WebP, GIF, BMP, TIFF; CMYK, 16-bit, palette, greyscale, alpha),
what comes out is 8-bit RGB pixels, upright, on white where it was transparent, at most
``MAX_IMAGE_SIDE`` pixels on its longest side (larger pictures are scaled down with a Lanczos
filter). libmtmd gets those raw pixels (``mtmd_bitmap_init``): no second decode of a compressed
file, and never more pixels than a vision model looks at.

Inputs are hostile until decoded: only regular files are opened as paths (a FIFO or a device
is refused, ``-`` is the way to stream), bytes are counted as they arrive against
``max_bytes``, any exception a decoder raises is bad input (exit 4), and what native decoders
(libtiff) write to file descriptor 2 is captured, never shown.

Longer than our ~400 lines on purpose: it is the only place that decodes, and the bounds on
reading (bytes, pixels, time, memory) must sit beside the decoder they guard.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, BinaryIO, TypeVar

from .errors import ImageError
from .files import open_image_file, read_source
from .options import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS
from .text import escaped

if TYPE_CHECKING:
    from PIL import Image

_T = TypeVar("_T")
SUPPORTED = "JPEG, PNG, WebP, GIF, BMP, TIFF"
_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO", "DIB")
_BAND_PIXELS = 1 << 20  # pixels converted at a time: 4 MiB of RGBA
# The longest side an image keeps; a larger one is scaled down to it. No vision projector in
# llama.cpp (tools/mtmd/clip.cpp, mtmd-image.cpp) looks at more: LLaVA-1.5 sees 336x336,
# LLaVA-1.6 tiles of up to 672x672 or 336x1344, Gemma 3 896x896, InternVL twelve 448-pixel
# tiles, Qwen2/2.5-VL up to 4,096 tokens of 28x28 pixels (1792x1792), and the largest budget,
# HunyuanVL's 16,384 tokens, is 4096x4096 with 16-pixel patches merged 2x2 (YoutuVL alone
# allows 62,500 tokens, "8000 * 8000" in clip.cpp's note; scaled, it gets 16,384). Beyond it
# pixels only cost memory: libmtmd copies the bitmap, and its resampler's weight tables grow
# with the input's sides (a 1 x 99,000,000 strip ran it out of 4 GB).
MAX_IMAGE_SIDE = 4096
# How many times longer than wide (or wide than tall) an image may be. clip.cpp's llava-uhd
# slicer (MiniCPM-V) gives the overview about 448x448 pixels, but never less than one 14-pixel
# patch across: past 1024:1 its patch count, and the encoder's memory, grow with the ratio.
# Within it, an image scaled to MAX_IMAGE_SIDE keeps a short side of at least 4 pixels.
MAX_ASPECT_RATIO = 1024
# Scaling first averages blocks of pixels (Image.reduce) down to within this factor of the
# target, then resamples with Lanczos: as sharp as Lanczos all the way, and faster.
_REDUCING_GAP = 3.0


@dataclass(frozen=True)
class PreparedImage:
    source: str  # the path as given, or "-" for stdin
    sha256: str  # of the source bytes
    format: str  # as Pillow detected it
    mode: str  # the source colour mode, before conversion
    width: int  # of the pixels the model gets (after scaling down, if it was)
    height: int
    rgb: bytes  # width * height * 3 bytes
    key: str  # identifies the pixels: the same picture in another file has the same key
    scaled_from: tuple[int, int] | None = None  # the upright size before scaling, if scaled

    def size_text(self, times: str = "x") -> str:
        """``640x480``, or ``10000x10000, scaled to 4096x4096``."""
        now = f"{self.width}{times}{self.height}"
        if self.scaled_from is None:
            return now
        width, height = self.scaled_from
        return f"{width}{times}{height}, scaled to {now}"

    def describe(self) -> str:
        """``size_text`` with the format and colour mode after the source's size."""
        width, height = self.scaled_from or (self.width, self.height)
        text = f"{width}x{height} {self.format} {self.mode}"
        return text if self.scaled_from is None else f"{text}, scaled to {self.width}x{self.height}"


# File name endings that make an argument an image path even when no such file exists (a typo
# is then reported as a missing image, not taken for the question).
# fmt: off
IMAGE_SUFFIXES = frozenset((
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".gif", ".bmp", ".dib", ".tif",
    ".tiff", ".mpo", ".heic", ".heif", ".avif", ".ppm", ".pgm", ".pbm", ".pnm", ".ico", ".tga",
    ".psd", ".svg", ".jxl",
))
# fmt: on


def looks_like_image_path(arg: str) -> bool:
    """Whether a command-line argument names an image (``-``, an existing path, a name with an
    image ending, or a word with no space and a slash, a leading ``.``/``~`` or a file name's
    ending) rather than being words of a question."""
    if arg == "-" or os.path.splitext(arg)[1].lower() in IMAGE_SUFFIXES:
        return True
    try:
        if os.path.lexists(arg):
            return True
    except (ValueError, OSError):  # a NUL byte, a name too long: not a file
        return False
    if arg.endswith("?"):  # "yes/no?": a question, whatever else it looks like
        return False
    return not any(c.isspace() for c in arg) and (
        "/" in arg
        or os.sep in arg
        or arg.startswith((".", "~"))
        or re.search(r"\.[A-Za-z0-9]{2,5}$", arg) is not None  # scan.pdf, a.pgn: a file's name
    )


def prepare(source: str, data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> PreparedImage:
    """Decode ``data`` into upright 8-bit RGB, refusing anything over ``max_pixels``."""
    return _decode(source, io.BytesIO(data), max_pixels)


def load(
    source: str,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    stdin: BinaryIO | None = None,
) -> PreparedImage:
    # Only the stream holds the source bytes, and it is closed once they are decoded: the
    # compressed file and the converted pixels are never in memory together.
    stream = io.BytesIO(read_source(source, stdin, max_bytes=max_bytes))
    return _decode(source, stream, max_pixels)


class BackgroundLoad:
    """``load(source)`` on a thread, to run while a model loads (reading, Pillow's decoders and
    llama.cpp's load all release the GIL). Call it for the image, or the ImageError ``load``
    would have raised; ``failed()`` says early that it will raise (a model load can stop
    then). Not for ``-``.

    A TIFF (anything but the formats of ``_quiet_decoder``) is only read there, and decoded
    by the call, on the caller's thread: libtiff writes to file descriptor 2, which ``load``
    captures for the whole process while it decodes, and the loading thread's own lines
    (progress, a failure) must not vanish into that capture. The other formats' decoders
    write nothing there (checked over Pillow's test images). Python's warnings filters are
    not thread-safe to swap, so on the thread Pillow's warnings are ignored by one filter set
    here, on the caller's thread, rather than by ``catch_warnings``."""

    def __init__(
        self,
        source: str,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    ) -> None:
        import threading
        import warnings

        warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
        self.source, self.max_pixels, self.max_bytes = source, max_pixels, max_bytes
        self._image: PreparedImage | None = None
        self._undecoded: bytes | None = None
        self._failure: BaseException | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._work, name="llava-image", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        source = self.source
        try:
            data = read_source(source, max_bytes=self.max_bytes)
            if not _quiet_decoder(data):
                self._undecoded = data
                return
            stream = io.BytesIO(data)
            del data  # only the stream holds the bytes, let go once decoded (as in load)
            self._image = _quietly(
                source,
                lambda native: _decode_quietly(source, stream, self.max_pixels, native),
                capture_native=False,
            )
        except BaseException as exc:  # handed to the caller, raised there
            self._failure = exc
        finally:
            self._done.set()

    def failed(self) -> bool:
        """Whether it is already known to fail (the thread has finished with an error)."""
        return self._done.is_set() and self._failure is not None

    def __call__(self) -> PreparedImage:
        self._thread.join()
        if self._failure is not None:
            raise self._failure
        if self._undecoded is not None:
            stream, self._undecoded = io.BytesIO(self._undecoded), None
            return _decode(self.source, stream, self.max_pixels)
        assert self._image is not None
        return self._image


def _quiet_decoder(data: bytes) -> bool:
    """Whether ``data`` starts as a PNG, JPEG (MPO too), GIF, BMP or WebP does: formats whose
    decoders never write to file descriptor 2. A TIFF, or anything else, is not."""
    return data.startswith(
        (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")
    ) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _decode(source: str, stream: io.BytesIO, max_pixels: int) -> PreparedImage:
    return _quietly(source, lambda native: _decode_quietly(source, stream, max_pixels, native))


def _quietly(
    source: str, work: Callable[[_NativeStderr], _T], *, capture_native: bool = True
) -> _T:
    """``work`` with Pillow's and the native decoders' chatter kept off stderr, and any
    failure turned into one ImageError.

    Pillow reports oddities of a file (unknown TIFF tags, palette notes) through logging and
    warnings, libtiff straight to file descriptor 2; stderr is ours. Failures still raise and
    become one ImageError line, with libtiff's last word as the reason where it has one.
    ``capture_native=False`` leaves file descriptor 2 alone (see BackgroundLoad)."""
    import logging
    import warnings

    logging.getLogger("PIL").setLevel(logging.CRITICAL)
    name = _shown(source)
    captured = _native_stderr_captured() if capture_native else _native_stderr_left()
    # off the main thread (capture_native=False) the filters are left as they are: swapping
    # them is not thread-safe, and BackgroundLoad set one that ignores Pillow's warnings
    quiet = warnings.catch_warnings() if capture_native else nullcontext()
    with quiet, captured as native:
        if capture_native:
            warnings.simplefilter("ignore")
        try:
            return work(native)
        except ImageError:
            raise
        except MemoryError:
            raise ImageError(
                f"not enough memory to decode {name}", "downscale it, or free some memory"
            ) from None
        except Exception as exc:  # any decoder failure is the file's fault, not ours
            raise ImageError(
                f"{name} is not a readable image ({_reason(exc, native)})", f"use {SUPPORTED}"
            ) from None


def _shown(source: str) -> str:
    return "the image on standard input" if source == "-" else source


def _decode_quietly(
    source: str, stream: io.BytesIO, max_pixels: int, native: _NativeStderr
) -> PreparedImage:

    name = _shown(source)
    sha256 = hashlib.sha256(stream.getvalue()).hexdigest()  # getvalue shares, never copies
    im = _open_checked(name, stream, max_pixels)
    try:
        fmt = im.format or "unknown"
        width, height = im.size
        mode = im.mode
        scaled = _scaled_size(width, height)
        try:
            im.seek(0)  # first frame of an animation
            if scaled is not None:
                # JPEG decodes at 1/2, 1/4 or 1/8 scale where that still covers the target:
                # a 100-megapixel photo then never takes 400 MB. A no-op for other formats.
                im.draft(None, scaled)
            im.load()
            orientation = _orientation(im)  # read while the file is still open
            stream.close()  # everything is decoded; let the source bytes go
            if scaled is not None and orientation in _TURNED:
                scaled = (scaled[1], scaled[0])
            original = (width, height) if orientation not in _TURNED else (height, width)
            width, height, pixels = upright_rgb_bytes(im, orientation, scaled)
        except MemoryError:
            raise
        except Exception as exc:
            if native.last_line():  # libtiff said why: an encoding this build lacks, most often
                raise ImageError(
                    f"{name} cannot be decoded ({_reason(exc, native)})",
                    "re-export it as PNG or JPEG",
                ) from None
            raise ImageError(
                f"{name} is truncated or corrupt ({_reason(exc, native)})",
                "re-export or re-download the image",
            ) from None
    finally:
        im.close()
    key = hashlib.sha256(f"{width}x{height}:".encode())
    key.update(pixels)
    return PreparedImage(
        source=source,
        sha256=sha256,
        format=fmt,
        mode=mode,
        width=width,
        height=height,
        rgb=pixels,
        key=key.hexdigest(),
        scaled_from=original if original != (width, height) else None,
    )


def _open_checked(name: str, stream: BinaryIO, max_pixels: int) -> Image.Image:
    """The image opened lazily (the header read, no pixels decoded), its format, size and
    shape checked against the limits."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # we enforce our own, configurable limit below
    try:
        im = Image.open(stream)
    except UnidentifiedImageError:
        raise ImageError(
            f"{name} is not an image this tool can read", f"use one of {SUPPORTED}"
        ) from None
    try:
        fmt = im.format or "unknown"
        if fmt not in _FORMATS:
            raise ImageError(f"{name} is a {fmt} image, which is not supported", f"use {SUPPORTED}")
        width, height = im.size
        if width * height == 0:
            raise ImageError(f"{name} is {width}x{height}: it has no pixels", f"use {SUPPORTED}")
        if width * height > max_pixels:
            raise ImageError(
                f"{name} is {width}x{height} = {width * height:,} pixels, over the limit of "
                f"{max_pixels:,} (a decompression bomb?)",
                "downscale it, or raise the limit with --max-pixels / LLAVA_MAX_PIXELS",
            )
        _check_aspect_ratio(name, width, height)
    except BaseException:
        im.close()
        raise
    return im


def check(
    source: str,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> None:
    """What ``load`` checks before it decodes: the file is there, a regular file within the
    byte limit, an image of a supported format, size and shape. Only the header is read and
    no pixels are decoded, so every image of a batch can be checked before a model is pulled
    or loaded, at a small cost. Not for ``-``: standard input can be read only once."""
    with open_image_file(source, max_bytes=max_bytes) as stream:  # the header only is read
        _quietly(source, lambda _: _open_checked(_shown(source), stream, max_pixels).close())


def _check_aspect_ratio(name: str, width: int, height: int) -> None:
    """Refuse, from the header alone, a picture too thin for any vision model to see."""
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageError(
            f"{name} is {width}x{height}: one side is over {MAX_ASPECT_RATIO} times the "
            "other, too thin a strip for a vision model",
            f"crop it into parts at most {MAX_ASPECT_RATIO} times as long as they are wide",
        )


def _scaled_size(width: int, height: int) -> tuple[int, int] | None:
    """The size to scale ``width`` x ``height`` down to, or None where it fits as it is:
    the longest side becomes MAX_IMAGE_SIDE, the other keeps the ratio (and a pixel at least)."""
    longest = max(width, height)
    if longest <= MAX_IMAGE_SIDE:
        return None
    return (
        max(1, round(width * MAX_IMAGE_SIDE / longest)),
        max(1, round(height * MAX_IMAGE_SIDE / longest)),
    )


class _NativeStderr:
    """What native code has written to file descriptor 2 while it pointed at ``sink``."""

    def __init__(self, sink: IO[bytes]) -> None:
        self.sink = sink

    def last_line(self) -> str:
        try:
            size = self.sink.seek(0, os.SEEK_END)
            self.sink.seek(max(0, size - 4096))
            text = self.sink.read().decode("utf-8", "replace")
        except OSError:
            return ""
        lines = [line for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else ""


@contextmanager
def _native_stderr_captured() -> Iterator[_NativeStderr]:
    """Point file descriptor 2 at a temporary file while decoders run, then restore it.

    libtiff prints warnings and errors with ``fprintf(stderr, …)``; Python's ``warnings`` and
    ``logging`` never see them. The capture is process-wide for its duration (decoding is
    short and happens before any progress display)."""
    with _temporary_file_or_devnull() as sink:
        try:
            saved: int | None = os.dup(2)
        except OSError:  # stderr is closed: keep it closed afterwards
            saved = None
        if sys.stderr is not None:
            with suppress(OSError, ValueError):
                sys.stderr.flush()
        os.dup2(sink.fileno(), 2)
        try:
            yield _NativeStderr(sink)
        finally:
            if saved is not None:
                os.dup2(saved, 2)
                os.close(saved)
            elif sink.fileno() != 2:
                os.close(2)


@contextmanager
def _native_stderr_left() -> Iterator[_NativeStderr]:
    """File descriptor 2 left as it is: nothing captured, so nothing to report."""
    yield _NativeStderr(io.BytesIO())


def _temporary_file_or_devnull() -> IO[bytes]:
    try:
        return tempfile.TemporaryFile()
    except OSError:  # no writable temporary directory: drop the chatter instead
        return open(os.devnull, "w+b")


_TIFF_NAME = re.compile(r"^\S+\.tiff?: ")  # libtiff names the file Pillow handed it


def _reason(exc: Exception, native: _NativeStderr) -> str:
    """A short, printable cause: libtiff's own last line when it spoke (Pillow only says
    "decoder error -2"), else the exception's message, else its type."""
    text = _TIFF_NAME.sub("", native.last_line()) or str(exc) or type(exc).__name__
    text = escaped(" ".join(text.split())).rstrip(".")  # one line; letters kept, controls shown
    return text if len(text) <= 120 else text[:117] + "..."


_TURNED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def upright_rgb_bytes(
    im: Image.Image, orientation: int = 1, size: tuple[int, int] | None = None
) -> tuple[int, int, bytes]:
    """``im`` as 8-bit RGB bytes, turned upright by its EXIF ``orientation``, flattened onto
    white where it is transparent, and scaled to ``size`` (upright) if one is given; with its
    width and height.

    Converted a band of rows at a time: besides ``im``, only the result and one band are ever
    in memory (a whole-image conversion chain holds two or three more full-size copies: 1.9 GB
    at 100 megapixels instead of 0.7). Scaling is Pillow's two separable passes, the first
    (across) done band by band as rows are converted, the second (down) on its narrow result,
    so the full-size RGB picture never exists."""
    from PIL import Image

    T = Image.Transpose
    method = {  # EXIF orientation → the turn that makes the picture upright
        2: T.FLIP_LEFT_RIGHT,
        3: T.ROTATE_180,
        4: T.FLIP_TOP_BOTTOM,
        5: T.TRANSPOSE,
        6: T.ROTATE_270,
        7: T.TRANSVERSE,
        8: T.ROTATE_90,
    }.get(orientation)
    width, height = im.size
    if orientation in _TURNED:
        width, height = height, width
    convert = _band_converter(im)
    rows = max(1, _BAND_PIXELS // width)
    tops = range(0, height, rows)
    bands = (convert(_stored_band(im, method, t, min(height, t + rows))) for t in tops)
    if size is None or size == (width, height):
        return width, height, _joined(bands, width, height)
    new_width, new_height = size
    lanczos = Image.Resampling.LANCZOS
    narrowed = Image.new("RGB", (new_width, height))
    for top, band in zip(tops, bands, strict=True):
        across = band.resize((new_width, band.height), lanczos, reducing_gap=_REDUCING_GAP)
        narrowed.paste(across, (0, top))
    scaled = narrowed.resize((new_width, new_height), lanczos, reducing_gap=_REDUCING_GAP)
    del narrowed
    rows = max(1, _BAND_PIXELS // new_width)
    tops = range(0, new_height, rows)
    parts = (scaled.crop((0, t, new_width, min(new_height, t + rows))) for t in tops)
    return new_width, new_height, _joined(parts, new_width, new_height)


def _joined(bands: Iterator[Image.Image], width: int, height: int) -> bytes:
    """The RGB ``bands``, top to bottom, as one ``width`` x ``height`` buffer, allocated once
    at its final size (``Image.tobytes`` of a whole image holds its pixels twice)."""
    out = io.BytesIO()
    out.seek(width * height * 3 - 1)
    out.write(b"\0")
    out.seek(0)
    for band in bands:
        out.write(band.tobytes())
    return out.getvalue()  # the buffer itself, not a copy


def _orientation(im: Image.Image) -> int:
    value = im.getexif().get(0x0112, 1)  # EXIF Orientation
    return value if isinstance(value, int) else 1


def _stored_band(
    im: Image.Image, method: Image.Transpose | None, top: int, bottom: int
) -> Image.Image:
    """Rows ``top`` to ``bottom`` of the upright picture: the part of the stored image they
    come from, cropped, then turned by the EXIF orientation's ``method``."""
    from PIL import Image

    T = Image.Transpose
    w, h = im.size
    if method is None:
        return im.crop((0, top, w, bottom))
    if method is T.FLIP_LEFT_RIGHT:
        box = (0, top, w, bottom)
    elif method in (T.ROTATE_180, T.FLIP_TOP_BOTTOM):
        box = (0, h - bottom, w, h - top)
    elif method in (T.TRANSPOSE, T.ROTATE_270):  # upright rows are stored columns
        box = (top, 0, bottom, h)
    else:  # ROTATE_90, TRANSVERSE: upright rows are stored columns, counted from the right
        box = (w - bottom, 0, w - top, h)
    return im.crop(box).transpose(method)


def _band_converter(im: Image.Image) -> Callable[[Image.Image], Image.Image]:
    """What turns a band of ``im`` into 8-bit RGB; decided once, from the whole image."""
    from PIL import Image

    def to_8bit(band: Image.Image) -> Image.Image:
        if band.mode.startswith("I;16") or band.mode == "I":
            # 16-bit samples: scale to 8 bits (Pillow's own conversion clips at 255 instead).
            wide = band if band.mode == "I" else band.convert("I")
            return wide.point(lambda v: v * (1 / 256)).convert("L")
        if band.mode == "F":
            return band.convert("L")
        return band

    def flatten(band: Image.Image) -> Image.Image:
        rgba = to_8bit(band).convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")

    def plain(band: Image.Image) -> Image.Image:
        band = to_8bit(band)
        return band if band.mode == "RGB" else band.convert("RGB")

    eight_bit_mode = to_8bit(im.crop((0, 0, 1, 1))).mode
    if eight_bit_mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        return flatten
    if im.mode == "CMYK" and im.info.get("icc_profile"):
        icc = _icc_to_srgb(im.info["icc_profile"])
        if icc is not None:
            return icc
    return plain


def _icc_to_srgb(profile: bytes) -> Callable[[Image.Image], Image.Image] | None:
    """Conversion of CMYK through the embedded ICC profile; None if littleCMS cannot."""
    from PIL import ImageCms

    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        transform = ImageCms.buildTransform(src, ImageCms.createProfile("sRGB"), "CMYK", "RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return None

    def convert(band: Image.Image) -> Image.Image:
        out = ImageCms.applyTransform(band, transform)
        assert out is not None  # applyTransform returns None only in place
        return out

    return convert


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
