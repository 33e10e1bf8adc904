"""Numbers for people: byte sizes in the units a download dialog uses (powers of 1000), and
exact ones for limits (``268,435,456 bytes (256 MiB)``)."""

from __future__ import annotations


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def exact_bytes(n: int) -> str:
    """``268,435,456 bytes (256 MiB)``: exact, and readable."""
    exact = f"{n:,} bytes"
    if n < 1024:
        return exact
    value, unit = n / 1024, "KiB"
    for larger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{exact} ({value:.4g} {unit})"


def plural(n: int, word: str, plural: str | None = None) -> str:
    """``1 token``, ``2 tokens``, ``0 tokens``; ``plural`` for the irregular (``1 entry``,
    ``3 entries``)."""
    return f"{n} {word if n == 1 else plural or word + 's'}"


def rate(count: int, seconds: float, unit: str) -> str:
    """``12.3 tokens/s``; ``tokens/s n/a`` when there is nothing to measure (no time, or
    nothing counted: a one-token answer has no decode time after its first token)."""
    if count <= 0 or seconds <= 0:
        return f"{unit}/s n/a"
    return f"{count / seconds:.1f} {unit}/s"
