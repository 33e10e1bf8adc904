"""The two hex names llava trusts as paths and pins: a sha256 digest and a git commit id.

Both name folders or files on disk (``blobs/<sha256>``, ``snapshots/<commit>``), so they are
checked whole, lowercase only, with ``fullmatch``: ``$`` alone would let a trailing newline in.
"""

from __future__ import annotations

import re

SHA256 = re.compile(r"[0-9a-f]{64}")  # a sha256 digest: 64 lowercase hex digits
COMMIT = re.compile(r"[0-9a-f]{40}")  # a git commit (or blob) id: sha1, 40 lowercase hex digits


def is_sha256(text: str) -> bool:
    return SHA256.fullmatch(text) is not None


def is_commit(text: str) -> bool:
    return COMMIT.fullmatch(text) is not None
