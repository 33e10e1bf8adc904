"""Reading and writing files, bounded and only when they are regular files: those a user names
(images, chats, settings) and llava's own (pull records, refs, prefix-cache entries).

A path can name a FIFO (the read waits forever for a writer), a device (``/dev/zero`` never
ends), or a symbolic link whose target is somewhere else. Reads open without blocking, check
what they opened and stop at a byte limit; writes refuse to replace anything but a regular file.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import BadInput, ImageError
from .options import DEFAULT_MAX_IMAGE_BYTES
from .units import exact_bytes


def kind_of(mode: int) -> str:
    """What a file is, in words, for errors ("a FIFO", "a directory", …)."""
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


# -- images: a path or standard input ------------------------------------------------------

_READ_CHUNK = 1 << 20
_RAISE_BYTES_HINT = "raise the limit with --max-image-bytes / LLAVA_MAX_IMAGE_BYTES"
_STDIN_HINT = "pipe an image in: cat x.png | llava ask -"


def read_source(
    source: str, stdin: BinaryIO | None = None, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
) -> bytes:
    """The bytes of ``source``: a regular file's path, or ``-`` for standard input. More than
    ``max_bytes`` is refused as soon as it is seen, before it is all read."""
    if source == "-":
        if stdin is None and (sys.stdin is None or sys.stdin.isatty()):
            raise ImageError(
                "'-' reads an image from standard input, but nothing is piped in", _STDIN_HINT
            )
        stream = stdin or sys.stdin.buffer
        data = _read_bounded(stream.read, max_bytes, _READ_CHUNK, "standard input")
        if not data:
            raise ImageError("no image data on standard input", _STDIN_HINT)
        return data
    fd = _open_regular_file(source, max_bytes)
    try:
        size = os.fstat(fd).st_size
        # One read of the whole file when its size is known; a file that grows (or a /proc
        # file that claims size 0) is still cut off at max_bytes + 1.
        first = min(size, max_bytes) + 1
        data = _read_bounded(lambda n: os.read(fd, n), max_bytes, first, f"image {source}")
    except OSError as exc:
        raise ImageError(f"cannot read image {source}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if not data:
        raise ImageError(f"image {source} is empty", "pass a complete image file")
    return data


def open_image_file(source: str, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> BinaryIO:
    """``source`` opened for reading, refused as ``read_source`` refuses it (not a regular
    file, over ``max_bytes``, empty), with nothing read yet: for a look at its header."""
    fd = _open_regular_file(source, max_bytes)
    if os.fstat(fd).st_size == 0:
        os.close(fd)
        raise ImageError(f"image {source} is empty", "pass a complete image file")
    return os.fdopen(fd, "rb")


def _open_regular_file(source: str, max_bytes: int) -> int:
    """A read-only descriptor on ``source``, which must be a regular file (a symbolic link to
    one is fine) of at most ``max_bytes``. Checked before opening, so that opening a device has
    no side effect, and again on the open descriptor, in case the path was swapped between."""
    try:
        _check_regular(source, os.stat(source), max_bytes)
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC  # a FIFO cannot block
        fd = os.open(source, flags)
    except FileNotFoundError:
        raise ImageError(f"image {source} does not exist", "check the path") from None
    except PermissionError:
        raise ImageError(f"cannot read image {source}: permission denied") from None
    except ValueError:  # a NUL byte in the path
        raise ImageError(f"image path {source!r} holds a NUL byte", "check the path") from None
    except OSError as exc:
        raise ImageError(f"cannot read image {source}: {exc.strerror or exc}") from None
    try:
        _check_regular(source, os.fstat(fd), max_bytes)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_regular(source: str, st: os.stat_result, max_bytes: int) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{source} is a directory, not an image", "pass image files")
    if not stat.S_ISREG(st.st_mode):
        kind = kind_of(st.st_mode)
        hint = (
            f"read it as standard input: llava ask - < {source}"
            if stat.S_ISFIFO(st.st_mode)
            else "pass an image file; to stream one, pipe it to '-': … | llava ask -"
        )
        raise ImageError(f"{source} is {kind}, not a regular file", hint)
    if st.st_size > max_bytes:
        raise ImageError(
            f"image {source} is {exact_bytes(st.st_size)}, "
            f"over the limit of {exact_bytes(max_bytes)}",
            _RAISE_BYTES_HINT,
        )


def _read_bounded(read: Callable[[int], bytes], max_bytes: int, first: int, what: str) -> bytes:
    """Everything ``read`` gives, or ImageError as soon as it gives more than ``max_bytes``:
    at most ``max_bytes + 1`` bytes are ever held, however much is on offer, and never twice
    (the first read is returned as it is when it was all; later ones grow one buffer). A limit
    raised past the memory there is (a 4 GiB sparse file under ``--max-image-bytes 4G``) is an
    ImageError too, not a MemoryError."""
    try:
        return _read_all_bounded(read, max_bytes, first, what)
    except MemoryError:
        raise ImageError(
            f"not enough memory to read {what}: "
            f"--max-image-bytes allows up to {exact_bytes(max_bytes)}",
            "lower --max-image-bytes / LLAVA_MAX_IMAGE_BYTES "
            f"(the default is {DEFAULT_MAX_IMAGE_BYTES >> 20} MiB), or free some memory",
        ) from None


def _read_all_bounded(read: Callable[[int], bytes], max_bytes: int, first: int, what: str) -> bytes:
    data = read(min(first, max_bytes + 1))
    total = len(data)
    grown: io.BytesIO | None = None
    while data and total <= max_bytes:
        chunk = read(min(_READ_CHUNK, max_bytes + 1 - total))
        if not chunk:
            break
        if grown is None:
            grown = io.BytesIO(data)
            grown.seek(0, io.SEEK_END)
        grown.write(chunk)
        total += len(chunk)
    if total > max_bytes:
        raise ImageError(
            f"{what} is more than {exact_bytes(max_bytes)}, the limit for an image",
            _RAISE_BYTES_HINT,
        )
    return data if grown is None else grown.getvalue()


# -- other files a user names --------------------------------------------------------------


def read_regular(path: Path, max_bytes: int, what: str) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``max_bytes``; else BadInput
    naming ``what`` ("chat file") and the reason. Never blocks on a FIFO."""
    try:
        if not stat.S_ISREG(mode := os.stat(path).st_mode):  # before opening: no side effect
            raise BadInput(f"{what} {path} is {kind_of(mode)}", "give a regular file")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise BadInput(f"{what} {path} does not exist", "check the path") from None
    except ValueError:  # a NUL byte in the path
        raise BadInput(f"{what} path {str(path)!r} holds a NUL byte", "check the path") from None
    except OSError as exc:
        raise BadInput(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadInput(f"{what} {path} is {kind_of(info.st_mode)}", "give a regular file")
        if info.st_size > max_bytes:
            raise BadInput(
                f"{what} {path} is {exact_bytes(info.st_size)}, over the limit of "
                f"{exact_bytes(max_bytes)}",
                "is it the right file?",
            )
        try:
            data = f.read(max_bytes + 1)
        except OSError as exc:
            raise BadInput(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:  # it grew while we read it
        raise BadInput(f"{what} {path} is over the limit of {exact_bytes(max_bytes)}")
    return data


def check_write_target(path: Path, what: str) -> None:
    """Refuse to replace anything but a regular file (or nothing) at ``path``: writing goes
    through a temporary file and a rename, which would put a file in place of a device, a
    FIFO or a symbolic link (leaving the link's target as it was)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise BadInput(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    if stat.S_ISLNK(info.st_mode):
        raise BadInput(
            f"{path} is a symbolic link (to {os.readlink(path)}); {what}s are not written "
            "through links",
            "give the real path, or another name",
        )
    if not stat.S_ISREG(info.st_mode):
        raise BadInput(f"{path} is {kind_of(info.st_mode)}, not a file", "give a file name")


# -- llava's own files: prefix-cache entries, records, refs, saved chats ------------------

Bytes = bytes | bytearray | memoryview
_OPEN_OWN = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)  # a FIFO put in a file's place must not hang the open
    | getattr(os, "O_NOFOLLOW", 0)  # nor a link lead the read elsewhere
    | getattr(os, "O_CLOEXEC", 0)
)


def open_own_file(path: Path) -> io.FileIO | None:
    """A file llava keeps in its own folders (a prefix-cache entry, a record, a ref), opened
    for reading; None when it is missing, unreadable or not a regular file (a folder, a FIFO,
    a device, a symbolic link): such a file is as good as absent. Never blocks."""
    try:
        fd = os.open(path, _OPEN_OWN)
    except (OSError, ValueError):  # missing, a link (ELOOP), a permission, a NUL in the name
        return None
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return io.FileIO(fd, "rb", closefd=True)
    except OSError:
        pass
    os.close(fd)
    return None


def fill(f: io.FileIO, view: memoryview) -> bool:
    """Fill ``view`` from ``f``; False if the file ends first (it shrank while we read it).
    In pieces: one read() returns at most ~2 GiB on Linux."""
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            return False
        got += n
    return True


def read_own_file(path: Path, max_bytes: int) -> bytearray | None:
    """The bytes of a file llava keeps in its own folders, or None when ``open_own_file``
    refuses it, or it is larger than ``max_bytes``. Never blocks, and never allocates more
    than ``max_bytes``."""
    f = open_own_file(path)
    if f is None:
        return None
    with f:
        try:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                return None
            data = bytearray(size)
            return data if fill(f, memoryview(data)) else None
        except (OSError, MemoryError):
            return None


def write_atomic(path: Path, *parts: Bytes) -> None:
    """Write ``parts`` one after another to a temporary file beside ``path``, then rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                out.write(part)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
