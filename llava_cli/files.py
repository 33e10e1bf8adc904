"""Reading and writing the files a user names, bounded and only when they are regular files.

A path can name a FIFO (the read waits forever for a writer), a device (``/dev/zero`` never
ends), or a symbolic link whose target is somewhere else. Reads open without blocking, check
what they opened and stop at a byte limit; writes refuse to replace anything but a regular file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import BadInput
from .units import human_bytes


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


def read_regular(path: Path, max_bytes: int, what: str) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``max_bytes``; else BadInput
    naming ``what`` ("chat file") and the reason. Never blocks on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise BadInput(f"{what} {path} does not exist", "check the path") from None
    except OSError as exc:
        raise BadInput(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadInput(f"{what} {path} is {kind_of(info.st_mode)}", "give a regular file")
        if info.st_size > max_bytes:
            raise BadInput(
                f"{what} {path} is {human_bytes(info.st_size)}, over the limit of "
                f"{human_bytes(max_bytes)}",
                "is it the right file?",
            )
        try:
            data = f.read(max_bytes + 1)
        except OSError as exc:
            raise BadInput(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:  # it grew while we read it
        raise BadInput(f"{what} {path} is over the limit of {human_bytes(max_bytes)}")
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
