"""``llava list`` and ``llava list --available``: what is on disk, and what can be pulled, in
tables that fit the terminal (paths with ``~``, cut in the middle; columns left out when short).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .. import hub, registry, render, store
from ..config import environment
from ..digests import is_commit
from ..errors import EXIT_OK, LlavaError
from ..modelref import choose_files
from ..registry import ModelSpec, Ref
from ..text import cell_width, display_path


def list_pulled(*, json: bool = False) -> int:
    skipped: list[tuple[Path, str]] = []
    records = list(store.records(skipped))
    _note_skipped(skipped)
    if json:
        render.json_value([_record_json(r) for r in records])
        return EXIT_OK
    if not records:
        render.info(empty_hint())
        return EXIT_OK
    rows = [["NAME", "QUANT", "SIZE", "PULLED", "PATH"]]
    for r in records:
        when = time.strftime("%Y-%m-%d", time.localtime(r.pulled_at)) if r.pulled_at else "?"
        size = render.human_bytes(r.size) if r.present() else "missing"
        rows.append([r.ref.rsplit(":", 1)[0], r.quant, size, when, display_path(r.model.path)])
    _cut_paths(rows, 4)
    render.table(rows, shrink=[4])
    return EXIT_OK


def empty_hint() -> str:
    """What ``llava list`` says before anything is pulled: the registry default, which the
    README's quick start names too."""
    return "no models pulled yet — try: llava pull " + registry.load().default


def _cut_paths(rows: list[list[str]], column: int) -> None:
    """Paths too long for the terminal lose their middle, not the file name at their end."""
    limit = render.output_width(sys.stdout)
    if limit is None:
        return
    others = sum(max(cell_width(row[i]) for row in rows) + 2 for i in range(len(rows[0])))
    others -= max(cell_width(row[column]) for row in rows) + 2
    room = max(limit - others, _MIN_PATH)
    mark = render.ellipsis(sys.stdout)
    for row in rows[1:]:
        row[column] = _cut_middle(row[column], room, mark)


_MIN_PATH = 10  # as render.table cuts a column


def _cut_middle(text: str, width: int, mark: str) -> str:
    """A commit id in the path goes first (``snapshots/…/x.gguf``), then the middle."""
    if cell_width(text) <= width or not text.isascii():
        return text  # render.table cuts what is left over (at the end)
    parts = text.split("/")
    text = "/".join(mark if is_commit(p) else p for p in parts)
    if len(text) <= width:
        return text
    room = width - len(mark)
    tail = min(len(parts[-1]) + 1, room - room // 4)
    return text[: room - tail] + mark + text[len(text) - tail :]


def _note_skipped(skipped: list[tuple[Path, str]]) -> None:
    """One line on stderr for the files in the records folder that are not records."""
    if not skipped:
        return
    path, why = skipped[0]
    more = f" (and {len(skipped) - 1} more files in {path.parent})" if len(skipped) > 1 else ""
    render.info(f"skipped {path}: {why}{more} — delete it, or pull the model again")


def _record_json(r: store.Pulled) -> dict[str, Any]:
    return asdict(r) | {"size": r.size, "present": r.present()}


def list_available(*, json: bool = False) -> int:
    reg = registry.load()
    pulled = {r.ref for r in store.records() if r.present()}
    if json:
        render.json_value([_spec_json(s, reg, pulled) for s in reg.models.values()])
        return EXIT_OK
    offline = environment().hub_offline
    sizes = catalogue_sizes(list(reg.models.values()), offline=offline)
    width = render.output_width(sys.stdout)  # None in a pipe: every cell whole
    columns = [
        _Column("NAME", [_name(s.spec.key, reg.default) for s in sizes]),
        _Column("ALIASES", [", ".join(s.spec.aliases) or "-" for s in sizes], True, least=20),
        _Column("PARAMS", [s.spec.parameters for s in sizes]),
        _Column("QUANT", [s.quant for s in sizes]),
        _Column("DOWNLOAD", [s.text for s in sizes]),
        _Column("PULLED", ["yes" if f"{s.spec.key}:{s.quant}" in pulled else "" for s in sizes]),
        _Column("LICENSE", [s.spec.license for s in sizes], optional=2),
        _Column("DESCRIPTION", [_short(s.spec.description, width) for s in sizes], True, 1, 24),
    ]
    columns = _fitting(columns, width)
    rows = [[c.header for c in columns], *map(list, zip(*(c.cells for c in columns), strict=True))]
    render.table(rows, shrink=[i for i, c in enumerate(columns) if c.shrink])
    if any(s.text == "?" for s in sizes):
        why = "; the hub is asked for it when online" if offline else ", and the hub did not answer"
        render.info(f"?: no size in the registry{why}")
    return EXIT_OK


def _name(key: str, default: str) -> str:
    return key + " (default)" if key == default else key


@dataclass(frozen=True)
class _Column:
    header: str
    cells: list[str]
    shrink: bool = False  # may be cut to fit the width
    optional: int = 0  # left out when the width is short: the highest number first
    least: int = 10  # the fewest columns it is worth showing in

    @property
    def width(self) -> int:
        return max(cell_width(c) for c in [self.header, *self.cells])

    @property
    def narrowest(self) -> int:
        return min(self.width, self.least) if self.shrink else self.width


def _fitting(columns: list[_Column], limit: int | None) -> list[_Column]:
    """The columns that fit ``limit`` once the cuttable ones are cut: optional ones are left
    out (the highest ``optional`` first) until they do."""
    if limit is None:
        return columns
    for level in sorted({c.optional for c in columns if c.optional}, reverse=True):
        if sum(c.narrowest + 2 for c in columns) - 2 <= limit:
            break
        columns = [c for c in columns if c.optional != level]
    return columns


@dataclass(frozen=True)
class EntrySize:
    """A registry entry's default download: exact from its pins or the hub, else about."""

    spec: ModelSpec
    quant: str
    size: int | None
    exact: bool

    @property
    def text(self) -> str:
        if self.size is None:
            return "?"
        return render.human_bytes(self.size) if self.exact else "~" + render.human_bytes(self.size)


LISTING_DEADLINE = 3.0  # seconds `list -a` waits for the hub's sizes, all requests together


def catalogue_sizes(specs: list[ModelSpec], *, offline: bool) -> list[EntrySize]:
    """Each entry's download size: its pins, else what the hub lists (unless ``offline``),
    else the entry's approximate ``download`` figure."""
    sizes = []
    for spec in specs:
        quant, file = spec.quant(None)
        if file.size is not None and spec.mmproj.size is not None:
            sizes.append(EntrySize(spec, quant, file.size + spec.mmproj.size, True))
        else:
            sizes.append(EntrySize(spec, quant, spec.download, False))
    unknown = [s for s in sizes if s.size is None]
    if unknown and not offline:
        listed = _listed_sizes(unknown)
        sizes = [
            replace(s, size=listed[id(s)], exact=True) if listed.get(id(s)) else s for s in sizes
        ]
    return sizes


def _listed_sizes(entries: list[EntrySize]) -> dict[int, int | None]:
    """The hub's sizes for these entries, asked all at once and waited for at most
    LISTING_DEADLINE seconds in all: a hub that does not answer costs a `list -a` that long,
    never its timeouts and retries. The askers are daemon threads, so one still waiting
    neither holds the exit nor Ctrl-C."""
    import threading
    import time

    found: dict[int, int | None] = {}

    def ask(entry: EntrySize) -> None:
        found[id(entry)] = _listed_size(entry)

    threads = [threading.Thread(target=ask, args=(e,), daemon=True) for e in entries]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + LISTING_DEADLINE
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return dict(found)


def _listed_size(entry: EntrySize) -> int | None:
    """The default quant's and its projector's sizes from the repo's listing (one request)."""
    spec = entry.spec
    try:
        listing = hub.list_files(spec.repo, spec.revision)
        if spec.from_listing:
            _, model, mmproj = choose_files(Ref(spec.repo, entry.quant), listing.sizes)
        else:
            model, mmproj = spec.quant(None)[1].file, spec.mmproj.file
    except LlavaError:
        return None
    found = [listing.sizes.get(model, 0), listing.sizes.get(mmproj, 0)]
    return sum(found) if all(found) else None


def _short(text: str, width: int | None) -> str:
    """The description's first sentence; on a terminal (``width`` known), at most 60
    characters of it."""
    first = text.split(". ", maxsplit=1)[0].rstrip(".")
    if width is None or len(first) <= 60:
        return first
    return first[:59].rstrip(" ,;") + "…"


def _spec_json(spec: ModelSpec, reg: registry.Registry, pulled: set[str]) -> dict[str, Any]:
    data = asdict(spec)
    data["source"] = str(spec.source)
    data["default"] = spec.key == reg.default
    quants = list(spec.quants) or [spec.default_quant]
    data["pulled"] = sorted(q for q in quants if f"{spec.key}:{q}" in pulled)
    return data
